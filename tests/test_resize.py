"""resize.py: the linked training view (caches never land in the dataset) and resized copies."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_benchmark, table_rows, tree_hash, wait_for
from PIL import Image, ImageOps

from speedtrain import dataset, resize, util
from speedtrain.errors import DiskSpaceError, UsageError


def test_view_links_every_image_and_label_and_leaves_the_dataset_alone(make_dataset, tmp_path):
    root = make_dataset(6, 3)
    before = tree_hash(root)
    stats = dataset.scan(root)
    view_yaml = resize.make_view(stats, tmp_path / "view")
    assert tree_hash(root) == before
    data = yaml.safe_load(view_yaml.read_text())
    assert data["path"] == str(tmp_path / "view")
    assert data["nc"] == 80
    assert "download" not in data
    viewed = dataset.scan(view_yaml)
    assert (viewed.train_images, viewed.val_images, viewed.label_files) == (6, 3, stats.label_files)
    for image in viewed.split("train").image_files:
        assert os.path.realpath(image).startswith(str(root))


def test_train_and_val_sharing_a_folder_are_linked_once(make_dataset, tmp_path):
    root = make_dataset(4, 0)
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/train", "nc": 80}))
    view_yaml = resize.make_view(dataset.scan(root), tmp_path / "view")
    data = yaml.safe_load(view_yaml.read_text())
    assert data["train"] == data["val"] == ["images/s0"]


def test_view_follows_changes_and_drops_stale_caches(make_dataset, tmp_path):
    root = make_dataset(4, 1)
    view = tmp_path / "view"
    resize.make_view(dataset.scan(root), view)
    gone = sorted((root / "images" / "train").iterdir())[0]
    stale_npy = view / "images" / "s0" / f"{gone.stem}.npy"
    stale_npy.write_bytes(b"x")
    kept = sorted((root / "images" / "train").iterdir())[1]
    fresh_npy = view / "images" / "s0" / f"{kept.stem}.npy"
    fresh_npy.write_bytes(b"x")
    gone.unlink()
    resize.make_view(dataset.scan(root), view)
    assert not os.path.lexists(view / "images" / "s0" / gone.name)
    assert not stale_npy.exists()
    assert fresh_npy.exists()  # its image did not change: Ultralytics may reuse it
    assert dataset.scan(view / "data.yaml").train_images == 3


def test_an_unchanged_view_is_checked_with_one_readlink_a_link_and_no_stat_a_file(make_dataset, tmp_path, monkeypatch):
    """At 25,000 images the view's check ran a stat, an is_dir, an is_symlink and a readlink per link through
    pathlib (17-23 s); now one os.scandir walk and a readlink per link: counted, not timed."""
    root = make_dataset(12, 4)
    stats, view = dataset.scan(root), tmp_path / "view"
    resize.make_view(stats, view)
    links = sum(1 for p in view.rglob("*") if p.is_symlink())
    calls: dict[str, int] = {}
    for name in ("stat", "lstat", "readlink", "symlink", "unlink", "listdir"):
        real = getattr(os, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, counted)
    resize.make_view(stats, view)
    monkeypatch.undo()
    assert links == 12 + 4 + stats.label_files
    assert calls.get("readlink") == links
    assert calls.get("symlink", 0) == calls.get("unlink", 0) == 0  # nothing made again
    assert calls.get("stat", 0) + calls.get("lstat", 0) + calls.get("listdir", 0) <= 6  # per folder, not per file


def test_view_dir_is_stable_per_dataset(make_dataset, tmp_path):
    a, b = dataset.scan(make_dataset(2, 1, name="a")), dataset.scan(make_dataset(2, 1, name="b"))
    assert resize.view_dir(a, tmp_path) == resize.view_dir(a, tmp_path) != resize.view_dir(b, tmp_path)


def test_write_atomic_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "sub" / "f.json"
    util.write_atomic(target, b"{}")
    util.write_atomic(target, b'{"a": 1}')
    assert target.read_bytes() == b'{"a": 1}'
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]


# --- resizing -------------------------------------------------------------------------------------------------


def _long_side(path: Path) -> int:
    with Image.open(path) as im:
        return max(ImageOps.exif_transpose(im).size)


def test_resized_copy_sizes_labels_and_untouched_original(make_dataset):
    root = make_dataset(8, 2)
    small = sorted((root / "images" / "train").iterdir())[0]
    with Image.open(small) as im:
        im.resize((300, 200)).save(small, quality=90)  # smaller than --size: must be copied, not upscaled
    before = tree_hash(root)
    stats = dataset.scan(root)
    summary = resize.resize_dataset(stats, 320, workers=2)
    out = Path(summary.out_dir)
    assert out == root.with_name("ds_320")
    assert tree_hash(root) == before
    assert (summary.resized, summary.copied, summary.failed) == (9, 1, ())
    for src in stats.split("train").image_files + stats.split("val").image_files:
        src = Path(src)
        dst = out / src.relative_to(root)
        with Image.open(src) as a, Image.open(dst) as b:
            assert b.format == a.format
            if max(a.size) > 320:
                assert max(b.size) == 320
                assert b.size[0] / b.size[1] == pytest.approx(a.size[0] / a.size[1], rel=0.01)
            else:
                assert dst.read_bytes() == src.read_bytes()
    labels = sorted((root / "labels").rglob("*.txt"))
    assert labels
    for label in labels:
        assert (out / label.relative_to(root)).read_bytes() == label.read_bytes()
    copy = dataset.scan(summary.yaml_path)
    assert (copy.train_images, copy.val_images, copy.label_files) == (8, 2, stats.label_files)
    assert "path" not in yaml.safe_load(Path(summary.yaml_path).read_text())


def test_exif_rotation_is_applied_to_pixels(make_dataset):
    root = make_dataset(1, 1)
    img = next((root / "images" / "train").iterdir())
    raw = Image.new("RGB", (800, 600), "blue")
    raw.paste((255, 0, 0), (0, 0, 400, 600))  # left half red in the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: viewers rotate the stored pixels 90 degrees clockwise
    raw.save(img, exif=exif.tobytes(), quality=95)
    summary = resize.resize_dataset(dataset.scan(root), 400, workers=1)
    out = Path(summary.out_dir) / img.relative_to(root)
    with Image.open(out) as im:
        assert im.getexif().get(0x0112, 1) == 1  # the tag is gone: pixels are already upright
        assert im.size == (300, 400)  # portrait, as viewers showed the original
        top, bottom = im.getpixel((150, 20)), im.getpixel((150, 380))
    assert top[0] > 200
    assert top[2] < 60
    assert bottom[2] > 200
    assert bottom[0] < 60
    # the label file is unchanged: YOLO labels refer to the displayed (upright) image
    label = root / "labels" / "train" / f"{img.stem}.txt"
    if label.exists():
        assert (Path(summary.out_dir) / label.relative_to(root)).read_bytes() == label.read_bytes()


def test_png_stays_png_and_16_bit_survives(make_dataset):
    root = make_dataset(2, 1)
    jpg = sorted((root / "images" / "train").iterdir())[0]
    with Image.open(jpg) as im:
        im.save(jpg.with_suffix(".png"))
    jpg.unlink()
    deep = sorted((root / "images" / "train").iterdir())[0]
    Image.new("I;16", (1000, 500), 40000).save(deep.with_name("deep.png"))
    summary = resize.resize_dataset(dataset.scan(root), 256, workers=1)
    out = Path(summary.out_dir) / "images" / "train"
    with Image.open(out / jpg.with_suffix(".png").name) as im:
        assert (im.format, max(im.size)) == ("PNG", 256)
    with Image.open(out / "deep.png") as im:
        assert im.format == "PNG"
        assert im.size == (256, 128)
        assert im.mode.startswith("I")
    assert summary.failed == ()


def test_corrupt_image_is_skipped_and_reported(make_dataset):
    root = make_dataset(4, 1)
    bad = sorted((root / "images" / "train").iterdir())[1]
    bad.write_bytes(b"\xff\xd8 broken")
    summary = resize.resize_dataset(dataset.scan(root), 320, workers=2)
    assert [p.file for p in summary.failed] == [str(bad)]
    assert summary.resized == 4


def test_second_run_is_incremental(make_dataset):
    root = make_dataset(6, 2)
    first = resize.resize_dataset(dataset.scan(root), 320, workers=2)
    second = resize.resize_dataset(dataset.scan(root), 320, workers=2)
    assert (first.processed, first.unchanged) == (8, 0)
    assert (second.processed, second.unchanged, second.labels_copied) == (0, 8, 0)
    changed = sorted((root / "images" / "train").iterdir())[2]
    with Image.open(changed) as im:
        im.rotate(180).save(changed, quality=90)
    gone = sorted((root / "images" / "train").iterdir())[3]
    gone.unlink()
    third = resize.resize_dataset(dataset.scan(root), 320, workers=2)
    assert (third.processed, third.unchanged, third.removed) == (1, 6, 1)
    assert not (Path(third.out_dir) / gone.relative_to(root)).exists()
    # a different size is a different job: everything is redone
    assert resize.resize_dataset(dataset.scan(root), 256, out=Path(third.out_dir)).processed == 7


def test_out_inside_the_dataset_is_refused(make_dataset):
    root = make_dataset(2, 1)
    with pytest.raises(UsageError, match="inside the dataset"):
        resize.resize_dataset(dataset.scan(root), 320, out=root / "small")


def test_in_place_resizes_atomically_and_keeps_labels(make_dataset):
    root = make_dataset(3, 1)
    labels = {p: p.read_bytes() for p in (root / "labels").rglob("*.txt")}
    summary = resize.resize_dataset(dataset.scan(root), 320, in_place=True, workers=2)
    assert summary.resized == 4
    assert summary.yaml_path is None
    assert all(_long_side(p) == 320 for p in (root / "images").rglob("*.jpg"))
    assert {p: p.read_bytes() for p in (root / "labels").rglob("*.txt")} == labels
    assert not list(root.rglob("*.tmp"))


def _big_dataset(make_dataset, n: int) -> Path:
    """n real COCO photos scaled up 4x and stored as PNG (no reduced-scale decoding), so resizing takes a while."""
    root = make_dataset(n, 1)
    for p in (root / "images" / "train").iterdir():
        with Image.open(p) as im:
            big = im.resize((im.width * 4, im.height * 4), Image.Resampling.NEAREST)
        big.save(p.with_suffix(".png"), compress_level=1)
        p.unlink()
    return root


IMAGES = 30  # with 4x photos: enough that on a busy machine (the test polling late) the kill lands midway


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_then_rerun_leaves_every_image_valid(make_dataset, tmp_path, sig):
    root = _big_dataset(make_dataset, IMAGES)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "speedtrain", "prepare", "--dataset", str(root), "--out", str(out), "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    # a few images in: the main process has recorded some of them (with only the first on disk, Ctrl-C could land
    # before its result reached the main process, and nothing would be recorded: a flaky test, seen in CI)
    started = wait_for(
        lambda: proc.poll() is not None or (out.is_dir() and len(list(out.rglob("*.png"))) >= 3), timeout=60
    )
    assert started
    assert proc.poll() is None, proc.stderr.read().decode()
    os.killpg(proc.pid, sig)
    proc.wait(timeout=30)
    done_at_kill = len(list(out.rglob("*.png")))
    assert 0 < done_at_kill < IMAGES, "the run was not interrupted midway"
    assert proc.returncode != 0
    summary = resize.resize_dataset(dataset.scan(root), 416, out, workers=2)
    assert summary.processed + summary.unchanged == IMAGES + 1  # and the val image
    if sig == signal.SIGINT:  # Ctrl-C saves the manifest: what was finished is not redone
        assert summary.unchanged > 0
    assert not list(out.rglob("*.tmp"))
    for p in out.rglob("*.png"):
        with Image.open(p) as im:
            im.load()  # raises on a truncated file
            assert max(im.size) == 416


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_a_stop_signal_to_check_alone_leaves_no_worker_behind(make_dataset, tmp_path, sig):
    """As `timeout`, CI or a scheduler stop it (the signal to speedtrain's process only, not its group): one line and
    128 + the signal's number, the workers gone with it, the dataset untouched; killed outright, the workers still
    end (the kernel stops them when their parent dies)."""
    import psutil

    root = _big_dataset(make_dataset, IMAGES)
    before = tree_hash(root)
    cmd = [sys.executable, "-m", "speedtrain", "check", "--dataset", str(root), "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    me = psutil.Process(proc.pid)
    assert wait_for(lambda: proc.poll() is not None or len(me.children()) >= 2, timeout=60)
    assert proc.poll() is None, proc.stderr.read()
    workers = me.children(recursive=True)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, [p.pid for p in alive]
    assert tree_hash(root) == before
    if sig == signal.SIGKILL:
        return
    err = proc.stderr.read()
    assert proc.returncode == {signal.SIGTERM: 143, signal.SIGHUP: 129}[sig]
    lines = err.strip().splitlines()  # a progress bar's last state may come first: stderr is not a terminal here
    assert lines[-1] == f"interrupted by {signal.Signals(sig).name}: nothing was changed; run check again"
    assert all(line.startswith("checking images") for line in lines[:-1]), err


@pytest.fixture
def small_disk(tmp_path):
    """A real 300 MB file system (tmpfs): big enough for prepare's up-front check, small enough to fill."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300M", "tmpfs", str(mnt)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small file system here ({made.stderr.decode().strip()[:80]})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_disk_that_fills_during_prepare_is_one_line_and_a_rerun_completes(make_dataset, tmp_path, small_disk):
    """Another writer fills the disk after a few images: prepare stops with one line naming the file and what is kept
    (exit 6), every image written is whole, none is dropped in silence; with room again, the same prepare completes."""
    root = make_dataset(24, 4)
    out = small_disk / "copy"
    filler = small_disk / "filler"

    def fill(done: int, total: int) -> None:
        if done == 6 and not filler.exists():  # the disk fills up while the copy is being written
            free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
            with filler.open("wb") as f:
                f.truncate(0)
                f.write(b"\0" * (free - 64 * 1024))

    stats = dataset.scan(root)
    with pytest.raises(DiskSpaceError) as err:
        resize.resize_dataset(stats, 64, out, workers=1, progress=fill)
    message = str(err.value)
    assert "\n" not in message
    assert "the disk is full" in message
    assert "run the same prepare again" in message
    assert err.value.exit_code == 6
    for p in out.rglob("*.jpg"):  # what was written is whole
        with Image.open(p) as im:
            im.load()
    assert not list(out.rglob("*.tmp"))
    filler.unlink()
    summary = resize.resize_dataset(stats, 64, out, workers=1)
    assert summary.processed + summary.unchanged == 28  # (a full disk may have refused the manifest: then redone)
    assert len(list(out.rglob("*.jpg"))) == 28
    assert summary.labels_copied > 0


def test_the_resized_copy_is_scanned_without_reading_its_labels_again(make_dataset, tmp_path, monkeypatch):
    """A run scans the dataset, resizes it and plans on the copy: the copy's labels are the originals' copied image
    for image, so their figures come from the first scan (25,000 label files are not read twice) and equal what
    reading them gives."""
    root = make_dataset(12, 4)
    original = dataset.scan(root)
    copy = resize.resize_dataset(original, 64, tmp_path / "copy")
    read = dataset.scan(copy.yaml_path)
    calls: list[Path] = []
    real = dataset._label_rows
    monkeypatch.setattr(dataset, "_label_rows", lambda label: calls.append(label) or real(label))
    taken = dataset.scan(copy.yaml_path, copy_of=original)
    assert calls == []
    assert taken.splits == read.splits  # the copy's own paths, the originals' label figures
    assert taken.fingerprint == read.fingerprint
    assert {Path(i).parent.parent.parent for s in taken.splits for i in s.image_files} == {tmp_path / "copy"}
    assert max(taken.image_sizes.dims[0]) <= 64  # the copy's own images, read from their headers


@pytest.mark.slow
def test_jpeg_quality_benchmark_smoke(tmp_path):
    """benchmarks/jpeg_quality.py end to end (tiny: the embedded sample at 160 px, COCO's yolov8n): the copy at
    quality 50 is smaller than at 95, auto names the qualities it chose, and the same weights score every copy."""
    out = run_benchmark("jpeg_quality.py", tmp_path, "--qualities", "auto,95,50")
    rows = table_rows(out, "auto ", "95 ", "50 ")
    assert [r[0].split(" (")[0] for r in rows] == ["auto", "95", "50"]
    assert re.fullmatch(r"auto \(\d+(/\d+)*\)", rows[0][0])
    assert float(rows[2][1]) < float(rows[1][1])  # the quality reached the encoder
    assert 0 < float(rows[1][4]) <= 1  # COCO weights on COCO photos: a real score
    assert all(0 <= float(r[4]) <= 1 for r in rows)


@pytest.mark.parametrize("saved_at", [40, 70, 85, 95])
def test_a_jpegs_own_quality_is_read_from_its_header(make_dataset, saved_at):
    """The quality setting a JPEG was saved with, by Pillow and by OpenCV (both libjpeg's tables), from its header."""
    import cv2

    root = make_dataset(1, 0)
    photo = next((root / "images" / "train").iterdir())
    with Image.open(photo) as im:
        im.convert("RGB").save(photo.with_name("pil.jpg"), quality=saved_at)
    cv2.imwrite(str(photo.with_name("cv.jpg")), cv2.imread(str(photo)), [cv2.IMWRITE_JPEG_QUALITY, saved_at])
    for name in ("pil.jpg", "cv.jpg"):
        with Image.open(photo.with_name(name)) as im:
            assert resize.jpeg_quality(im) == saved_at, name
    with Image.open(photo) as im:
        im.save(photo.with_name("lossless.png"))
    with Image.open(photo.with_name("lossless.png")) as im:
        assert resize.jpeg_quality(im) is None


def test_auto_quality_keeps_a_copy_of_compressed_photos_smaller_than_its_source(make_dataset):
    """--quality auto: photos stored at quality 70 are copied at 85 (not larger than their sources, where 95 is),
    a PNG stays lossless and uncounted; the manifest tells auto from a number, so changing it redoes the copies."""
    root = make_dataset(6, 2)
    for photo in (root / "images").rglob("*.jpg"):
        with Image.open(photo) as im:
            im.convert("RGB").save(photo, quality=70)
    png = next((root / "images" / "val").iterdir())
    with Image.open(png) as im:
        im.save(png.with_suffix(".png"))
    png.unlink()
    stats = dataset.scan(root)
    auto = resize.resize_dataset(stats, 416, workers=2)
    assert auto.qualities == ((85, 7),)
    out = Path(auto.out_dir)
    sources = sum(p.stat().st_size for p in (root / "images").rglob("*.jpg"))
    assert sum(p.stat().st_size for p in out.rglob("*.jpg")) < sources
    for copy in out.rglob("*.jpg"):
        with Image.open(copy) as im:
            assert resize.jpeg_quality(im) == 85
            assert max(im.size) == 416
    with Image.open(out / "images" / "val" / png.with_suffix(".png").name) as im:
        assert im.format == "PNG"
    fixed = resize.resize_dataset(stats, 416, workers=2, quality=95)
    assert (fixed.resized, fixed.unchanged, fixed.qualities) == (8, 0, ((95, 7),))
    assert sum(p.stat().st_size for p in out.rglob("*.jpg")) > sources  # at 95 the copies outgrow their sources
    again = resize.resize_dataset(stats, 416, workers=2, quality="auto")
    assert (again.resized, again.unchanged) == (8, 0)
    assert resize.resize_dataset(stats, 416, workers=2).unchanged == 8


@pytest.mark.parametrize("quality", [0, 101, "high", 9.5, True])
def test_a_quality_outside_1_to_100_is_one_clear_line(make_dataset, quality):
    root = make_dataset(2, 1)
    before = tree_hash(root)
    with pytest.raises(UsageError, match=r"--quality .*: a JPEG quality from 1 to 100, or auto"):
        resize.resize_dataset(dataset.scan(root), 320, workers=1, quality=quality)
    assert tree_hash(root) == before
    assert not root.with_name("ds_320").exists()


def test_copy_quality_rule():
    """95 where the source is not a JPEG or is stored at 80 or more; 15 above a lower one, never under 85."""
    assert [resize.copy_quality(q) for q in (None, 100, 95, 80, 75, 70, 40)] == [95, 95, 95, 95, 90, 85, 85]
