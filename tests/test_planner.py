"""The planner over a table of fake machines: batch, fallback chain, cache, workers and their reasons."""

from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import fake_stats, snapshot

from speedtrain import planner, ultra
from speedtrain.errors import UsageError
from speedtrain.planner import Overrides, plan
from speedtrain.records import StageResult
from speedtrain.speedreport import SpeedReport

# fake_stats(): 1000 train + 200 val images of 640x480 -> 0.435 GB decoded at 416, 1.03 GB at 640.
MACHINES = [
    # id, snapshot, device, batch, fallbacks, cache, workers
    ("cpu-2core-16gb", snapshot((), ram=16, cores=2), "cpu", 16, (8, 4), "ram", 0),
    # CPU with little RAM: the smallest CPU batch, and no fallback below it
    ("cpu-4gb", snapshot((), ram=4, cores=4), "cpu", 4, (), "ram", 0),
    ("gpu-6gb", snapshot((6,), ram=16, cores=16), "0", 32, (16, 8), "ram", 16),
    ("gpu-12gb-8gb-ram", snapshot((12,), ram=8, cores=16), "0", 48, (32, 16, 8), "ram", 12),
    # 4 GB RAM: 8 workers; cache needs 0.65 + 8 x 0.3 + 2 = 5.05 GB > 4 -> disk
    ("gpu-24gb-4gb-ram", snapshot((24,), ram=4, cores=16), "0", 48, (32, 16, 8), "disk", 8),
    ("gpu-80gb-64gb-ram", snapshot((80,), ram=64, cores=16), "0", 48, (32, 16, 8), "ram", 16),
    ("gpu-4gb", snapshot((4,), ram=16, cores=8), "0", 16, (8,), "ram", 8),
    # 2 GB card: even batch 8 does not fit the estimate; 8 is still tried, with nothing below it
    ("gpu-2gb", snapshot((2,), ram=16, cores=8), "0", 8, (), "ram", 8),
    # two GPUs: batch and chain are per-GPU x 2, workers split across the GPUs' share of 16 cores
    ("2x-gpu-24gb", snapshot((24, 24), ram=64, cores=16), "0,1", 96, (64, 32, 16), "ram", 8),
    ("gpu-24gb-2-cores", snapshot((24,), ram=64, cores=2), "0", 48, (32, 16, 8), "ram", 2),
    ("gpu-tiny-ram", snapshot((24,), ram=2, cores=16), "0", 48, (32, 16, 8), "disk", 4),
    # neither RAM nor disk has room for a cache
    ("gpu-no-room", snapshot((24,), ram=2, cores=16, disk=1.5), "0", 48, (32, 16, 8), False, 4),
]


@pytest.mark.parametrize(
    ("hw", "device", "batch", "fallbacks", "cache", "workers"),
    [m[1:] for m in MACHINES],
    ids=[m[0] for m in MACHINES],
)
def test_plan_for_machine(hw, device, batch, fallbacks, cache, workers):
    # photos far over the training size, not pre-resized: .npy files would hold them at full size, so the RAM rule
    # decides (test_a_pre_resized_copy_is_cached_on_disk for the copy)
    p = plan(hw, fake_stats(size=(1920, 1440)), Overrides(prepare="no"))
    main = p.stage("main")
    assert (p.device, main.batch, main.batch_fallbacks, main.cache, main.workers) == (
        device,
        batch,
        fallbacks,
        cache,
        workers,
    )
    for key in ("device", "batch", "cache", "workers", "imgsz", "rect", "epochs", "finetune"):
        assert p.reason(key), f"no reason for {key}"
    assert main.amp is bool(hw.gpus)
    assert main.train_args()["batch"] == batch


def test_main_stage_defaults_are_ultralytics_where_accuracy_is_at_stake():
    p = plan(snapshot((24,)), fake_stats())
    main = p.stage("main")
    # 80 classes: auto's AdamW rate 0.002 x 5 / 84, rounded to 6 places as Ultralytics does
    assert (main.imgsz, main.epochs, main.optimizer, main.lr0, main.cos_lr) == (416, 50, "auto", 0.000119, True)
    assert (main.rect, main.patience, main.close_mosaic) == (False, 100, 10)
    assert "AdamW at 0.000119" in p.reason("optimizer")
    assert "set by user" not in p.reason("optimizer")


@pytest.mark.parametrize(
    ("images", "batch", "epochs", "classes", "expected"),
    [
        (1000, 16, 50, 4, ("AdamW", 0.00125)),  # 16 nominal batches of 64 x 50 = 800 iterations
        (1000, 16, 50, 80, ("AdamW", 0.000119)),
        (64_000, 16, 10, 4, ("AdamW", 0.00125)),  # 1000 x 10 = 10,000: not over the limit
        (64_001, 16, 10, 4, ("MuSGD", 0.01)),  # 1001 x 10 iterations
        (1000, 128, 100, 4, ("AdamW", 0.00125)),  # a batch over 64 counts as itself: 8 x 100
    ],
)
def test_auto_optimizer_is_ultralytics_rule(images, batch, epochs, classes, expected):
    assert planner.auto_optimizer(images, batch, epochs, classes) == expected


def test_user_optimizer_and_lr0():
    def main_of(**kw):
        p = plan(snapshot((24,)), fake_stats(), Overrides(**kw))
        return p.stage("main"), p

    main, p = main_of(lr0=0.002)  # auto ignores lr0: its choice is named so that the rate takes effect
    assert (main.optimizer, main.lr0) == ("AdamW", 0.002)
    assert "--lr0 takes effect" in p.reason("optimizer")
    main, p = main_of(optimizer="SGD")
    assert (main.optimizer, main.lr0) == ("SGD", 0.01)
    main, p = main_of(optimizer="Adam")  # an adaptive optimizer gets auto's rate, not SGD's 0.01
    assert (main.optimizer, main.lr0) == ("Adam", 0.000119)
    main, p = main_of(optimizer="Adam", lr0=0.001)
    assert (main.optimizer, main.lr0, p.reason("lr0")) == ("Adam", 0.001, "set by user")


def test_reasons_say_why_in_figures():
    p = plan(snapshot((24,), ram=4), fake_stats())
    assert "GB free VRAM" in p.reason("batch")
    assert "4 GB available RAM" in p.reason("workers")
    # 0.435 GB x 1.5 + 8 workers x 0.3 GB + 2 GB = 5.05 GB; the .npy files are full size: 1.03 GB
    assert p.reason("cache").startswith("disk: RAM cache would need 5.1 GB")
    assert "~1.0 GB of .npy files" in p.reason("cache")
    assert "shuffle" in p.reason("rect")
    assert "mosaic" in p.reason("rect")


def test_larger_model_gets_smaller_batch():
    hw = snapshot((6,))
    assert plan(hw, fake_stats()).stage("main").batch == 32
    assert plan(hw, fake_stats(), Overrides(model="yolo26s.pt")).stage("main").batch == 16


@pytest.mark.parametrize(
    ("name", "scale"),
    [("yolo26n", "n"), ("yolov8s.pt", "s"), ("models/yolo11m.yaml", "m"), ("yolo26x", "x"), ("best.pt", "n")],
)
def test_model_scale(name, scale):
    assert planner.model_scale(name) == scale


def test_finetune_stage_at_640_needs_its_own_smaller_batch():
    p = plan(snapshot((6,)), fake_stats(), Overrides(finetune="yes"))
    main, ft = p.stage("main"), p.stage("finetune")
    assert (ft.imgsz, ft.epochs, ft.when, ft.warmup_epochs) == (640, 25, "always", 0.0)
    assert ft.lr0 == pytest.approx(main.lr0 / 10)
    # optimizer=auto would pick its full rate again: the fine-tune names auto's choice with auto's settings
    assert (main.optimizer, ft.optimizer) == ("auto", "AdamW")
    assert dict(ft.extra) == {"momentum": 0.9, "warmup_bias_lr": 0.0}
    mine = plan(snapshot((6,)), fake_stats(), Overrides(finetune="yes", extra=(("warmup_bias_lr", 0.05),)))
    assert mine.stage("finetune").train_args()["warmup_bias_lr"] == 0.05  # the user's key=value wins
    # 640^2 / 416^2 = 2.4x the memory per image: 32 at 416 becomes 8 at 640 on a 6 GB card
    assert (main.batch, ft.batch) == (32, 8)


@pytest.mark.parametrize(("mode", "when"), [("yes", "always"), ("auto", "auto"), ("ask", "ask")])
def test_finetune_modes(mode, when):
    p = plan(snapshot((24,)), fake_stats(), Overrides(finetune=mode, target_map=0.3))
    assert p.stage("finetune").when == when
    assert p.target_map == 0.3


def test_finetune_no_and_pointless_finetune_are_left_out():
    assert plan(snapshot((24,)), fake_stats(), Overrides(finetune="no")).stage("finetune") is None
    p = plan(snapshot((24,)), fake_stats(), Overrides(imgsz=640, finetune="yes"))
    assert p.stage("finetune") is None
    assert "already trains at 640" in p.reason("finetune")


def test_user_overrides_win_and_say_so():
    ov = Overrides(epochs=7, batch=24, imgsz=320, workers=3, cache="disk", device="0", rect=False, lr0=0.01)
    p = plan(snapshot((24,)), fake_stats(), ov)
    main = p.stage("main")
    assert (main.epochs, main.batch, main.imgsz, main.workers, main.cache, main.rect, main.lr0) == (
        7,
        24,
        320,
        3,
        "disk",
        False,
        0.01,
    )
    for key in ("epochs", "batch", "imgsz", "workers", "cache", "device"):
        assert p.reason(key).startswith("set by user"), key
    assert main.batch_fallbacks == (16, 8)  # the chain continues below a user batch


def test_user_batch_is_scaled_for_the_finetune():
    p = plan(snapshot((24,)), fake_stats(), Overrides(batch=32, finetune="yes"))
    assert p.stage("finetune").batch == 13  # 32 x (416/640)^2
    assert "scaled" in p.reason("finetune.batch")


def test_img_size_is_rounded_up_to_a_multiple_of_32_with_a_warning():
    p = plan(snapshot((24,)), fake_stats(), Overrides(imgsz=400))
    assert p.stage("main").imgsz == 416
    assert any("400 is not a multiple of 32" in w for w in p.warnings)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (Overrides(batch=0), "--batch-size 0"),
        (Overrides(batch=-4), "--batch-size -4"),
        (Overrides(imgsz=-32), "--img-size -32"),
        (Overrides(device="3"), "GPU 3 does not exist"),
        (Overrides(device="gpu"), "expected cpu, mps"),
        (Overrides(workers=-1), "--workers -1"),
        (Overrides(cache="fast"), "--cache 'fast'"),
    ],
)
def test_bad_overrides_raise_usage_errors(overrides, message):
    with pytest.raises(UsageError) as err:
        plan(snapshot((24, 24)), fake_stats(), overrides)
    assert message in str(err.value)


def test_device_on_a_cpu_machine_is_refused():
    with pytest.raises(UsageError) as err:
        plan(snapshot(()), fake_stats(), Overrides(device="0"))
    assert "no CUDA GPU" in str(err.value)


def test_device_subset_uses_only_those_gpus():
    p = plan(snapshot((24, 24, 24)), fake_stats(), Overrides(device="cuda:1"))
    assert (p.device, p.stage("main").batch) == ("1", 48)


def test_estimates_are_labelled_and_computed():
    p = plan(snapshot((24,)), fake_stats())
    est = dict(p.estimates)
    assert est["resolution"].startswith("2.37x")
    assert "estimate" in est["resolution"]
    assert est["iterations"].startswith("3.00x")  # ceil(1000/16) / ceil(1000/48) = 63 / 21


def test_extra_args_pass_through_and_fold_into_planned_knobs():
    known = ultra.defaults()
    extra = planner.parse_extra_args(["mosaic=0.5", "lr0=0.002", "fliplr=0", "plots=False"], known)
    p = plan(snapshot((24,)), fake_stats(), Overrides(extra=extra))
    args = p.stage("main").train_args()
    assert (args["mosaic"], args["lr0"], args["fliplr"], args["plots"]) == (0.5, 0.002, 0, False)
    assert p.reason("lr0") == "set by user"
    assert p.stage("finetune").train_args()["mosaic"] == 0.5


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("data=x.yaml", "use --dataset"),
        ("model=yolo.pt", "use --model"),
        ("mosiac=0.5", "not an Ultralytics train argument"),
        ("plots=maybe", "expected True or False"),
        ("mosaic", "look like key=value"),
    ],
)
def test_bad_extra_args(token, message):
    with pytest.raises(UsageError) as err:
        planner.parse_extra_args([token], ultra.defaults())
    assert message in str(err.value)


def test_every_stage_key_is_an_ultralytics_train_argument():
    known = ultra.defaults()
    p = plan(snapshot((24,)), fake_stats(), Overrides(finetune="yes"))
    for stage in p.stages:
        assert set(stage.train_args()) <= set(known)


def test_plan_json_has_the_documented_keys():
    hw, stats = snapshot((24,)), fake_stats()
    doc = SpeedReport.planned(hw, stats, plan(hw, stats)).to_dict()
    assert {"device", "stages", "reasons"} <= set(doc)
    keys = {"name", "imgsz", "epochs", "batch", "batch_fallbacks", "workers", "cache", "optimizer", "lr0"}
    keys |= {"cos_lr", "close_mosaic", "rect", "patience"}
    assert keys <= set(doc["stages"][0])


THREADS = [
    # id, snapshot, override, expected threads, reason contains
    # the 2-core development VM (no SMT): both cores; Ultralytics' own min(8, cores - 1) would be 1
    ("cpu-2-cores", snapshot((), cores=2, physical=2), None, 2, "Ultralytics' own setting would be 1"),
    ("cpu-8-logical-4-physical", snapshot((), cores=8, physical=4), None, 4, "one per physical core"),
    ("cpu-16-cores", snapshot((), cores=16, physical=16), None, 16, "would be 8"),
    # a 64-core server: every physical core, where Ultralytics caps at 8
    ("cpu-64-logical-32-physical", snapshot((), cores=64, physical=32), None, 32, "would be 8"),
    # on a GPU the training process is left as Ultralytics sets it: the cores feed the dataloader workers
    ("gpu-16-cores", snapshot((24,), cores=16), None, None, "on a GPU"),
    ("cpu-user-3", snapshot((), cores=16), 3, 3, "set by user"),
    ("gpu-user-4", snapshot((24,), cores=16), 4, 4, "set by user"),
]


@pytest.mark.parametrize(("hw", "override", "threads", "why"), [t[1:] for t in THREADS], ids=[t[0] for t in THREADS])
def test_threads_decision(hw, override, threads, why):
    p = plan(hw, fake_stats(), Overrides(threads=override))
    assert p.stage("main").threads == threads
    assert why in p.reason("threads")
    assert "threads" not in p.stage("main").train_args()  # not an Ultralytics argument: the runner applies it


def test_threads_override_must_be_positive():
    with pytest.raises(UsageError, match="--threads 0"):
        plan(snapshot(), fake_stats(), Overrides(threads=0))


@pytest.mark.parametrize(
    ("shm_gb", "workers", "why"),
    [
        # no /dev/shm to check (macOS, Windows, or a hand-written snapshot): the RAM/cores rule alone
        (None, 16, "16: 16 for 64 GB available RAM"),
        # a host's /dev/shm (half the RAM): room for every worker
        (32.0, 16, "16: 16 for 64 GB available RAM"),
        # a batch of 48 at 416 px is 23.2 MiB; 16 workers hold 16 x 4 + 16 (validation: 2 x 16, capped at the 16
        # cores) x 2 x 2 = 128 batches = 3.0 GB; 7 hold 7 x 4 + 14 x 2 x 2 = 84 = 1.95 GB, the most that fit in 2
        (2.0, 7, "/dev/shm has 2.00 GB free and 16 workers' batches would need about 3.0 GB"),
        # Docker's default 64 MB: not even one worker's 4 + 2 x 2 batches fit; load in the training process
        (0.06, 0, "Docker: --shm-size=8g"),
    ],
    ids=["no-shm", "roomy", "2gb", "docker-64mb"],
)
def test_workers_fit_in_dev_shm(shm_gb, workers, why):
    hw = replace(snapshot((80,), ram=64, cores=16), shm_free_gb=shm_gb)
    p = plan(hw, fake_stats())
    assert p.stage("main").batch == 48
    assert p.stage("main").workers == workers
    assert why in p.reason("workers")
    assert bool(p.warnings) is (workers < 16)


def test_user_workers_beyond_dev_shm_are_kept_with_a_warning():
    hw = replace(snapshot((80,), ram=64, cores=16), shm_free_gb=0.06)
    p = plan(hw, fake_stats(), Overrides(workers=8))
    assert p.stage("main").workers == 8
    assert any("Bus error" in w and "--shm-size" in w for w in p.warnings)


def test_batch_is_sized_from_the_gpus_in_device():
    # GPU 0 is nearly full (another job), GPU 1 is free: --device 1 plans from GPU 1's memory, not GPU 0's
    hw = snapshot((80, 80))
    hw = replace(hw, gpus=(replace(hw.gpus[0], free_vram_gb=3.0), hw.gpus[1]))
    on_1 = plan(hw, fake_stats(), Overrides(device="1"))
    assert (on_1.device, on_1.stage("main").batch) == ("1", 48)
    assert "of 76.0 GB free VRAM" in on_1.reason("batch")
    on_0 = plan(hw, fake_stats(), Overrides(device="0"))
    assert on_0.stage("main").batch == 8  # 3 GB free: (3 - 1) x 0.7 / 0.09 = 15.6 images fit, so 8 of the chain
    assert "of 3.0 GB free VRAM" in on_0.reason("batch")


@pytest.mark.parametrize(
    ("override", "extra", "expected", "why"),
    [
        (None, (), False, "deterministic kernels cost speed on a GPU"),
        (True, (), True, "set by user: deterministic algorithms on"),
        (None, (("deterministic", True),), True, "set by user"),  # deterministic=True as key=value
    ],
)
def test_deterministic_is_a_decision(override, extra, expected, why):
    p = plan(snapshot((24,)), fake_stats(), Overrides(deterministic=override, extra=extra))
    assert p.stage("main").deterministic is expected
    assert p.stage("main").train_args()["deterministic"] is expected  # Ultralytics receives it
    assert why in p.reason("deterministic")


@pytest.mark.parametrize(
    ("vram", "rect", "expected", "why"),
    [
        ((24,), None, False, "rect=False: shuffled batches with mosaic"),
        ((24,), True, True, "set by user; rect=True"),
        ((24, 24), None, False, "rect=False: DDP training on 2 ranks"),
        ((24, 24), True, False, "set by user, but rect=False"),  # Ultralytics would drop it silently
        ((24, 24), False, False, "set by user"),
    ],
)
def test_rect_under_multi_gpu_says_what_ultralytics_will_do(vram, rect, expected, why):
    p = plan(snapshot(vram), fake_stats(), Overrides(rect=rect))
    assert p.stage("main").rect is expected
    assert why in p.reason("rect")


def test_accuracy_sensitive_choices_cite_what_they_rest_on():
    p = plan(snapshot((24,)), fake_stats(), Overrides(finetune="auto"))
    for key, evidence in (
        ("imgsz", "imgsz"),
        ("optimizer", "optimizer"),
        ("rect", "rect"),
        ("cos_lr", "cos_lr"),
        ("patience", "patience"),
        ("finetune", "finetune"),
        ("val_every", "val_every"),
    ):
        assert planner.EVIDENCE[evidence] in p.reason(key), key
    mine = plan(snapshot((24,)), fake_stats(), Overrides(imgsz=640, rect=True, optimizer="SGD", patience=50))
    for key in ("imgsz", "optimizer", "patience"):
        assert mine.reason(key) == "set by user", key
    assert planner.EVIDENCE["rect-cost"] in mine.reason("rect")  # what the user's choice costs


@pytest.mark.parametrize(
    ("vram", "override", "extra", "expected", "why"),
    [
        ((24,), None, (), 1, "1: every epoch, as Ultralytics; measured from COCO weights"),
        ((24,), "auto", (), planner.VAL_AUTO, "auto: every epoch until one validation is timed"),
        ((24,), "AUTO", (), planner.VAL_AUTO, "under 15% of the run"),
        ((24,), "3", (), 3, "set by user; the last 2"),
        ((24,), 1, (), 1, "set by user"),
        ((24,), None, (("val", False),), 1, "val= is given"),
        ((24, 24), "auto", (), 1, "with 2 ranks every epoch is validated"),
    ],
)
def test_validation_cadence_is_planned(vram, override, extra, expected, why):
    p = plan(snapshot(vram), fake_stats(), Overrides(val_every=override, extra=extra, finetune="yes"))
    assert p.stage("main").val_every == expected
    assert p.stage("finetune").val_every == expected  # the fine-tune keeps the main stage's cadence
    assert "val_every" not in p.stage("main").train_args()  # speedtrain's own knob, not an Ultralytics argument
    assert why in p.reason("val_every")


@pytest.mark.parametrize(("vram", "value"), [((24,), "0"), ((24,), "often"), ((24,), "-2"), ((24, 24), "3")])
def test_an_impossible_cadence_is_refused(vram, value):
    with pytest.raises(UsageError, match=f"--val-every {value}"):
        plan(snapshot(vram), fake_stats(), Overrides(val_every=value))


@pytest.mark.parametrize(
    ("budget", "finetune", "extra", "hours", "why"),
    [
        ("2h", "no", (), {"main": 2.0}, "2h 00m: main 2h 00m"),
        ("1h30m", "yes", (), {"main": 1.05, "finetune": 0.45}, "30% for the fine-tune"),
        ("90m", "auto", (), {"main": 1.05, "finetune": 0.45}, "30% for the fine-tune"),  # measured: it pays
        ("90m", "ask", (), {"main": 1.5}, "1h 30m: main 1h 30m"),  # asked after main, it could leave 30% unused
        (0.5, "no", (), {"main": 0.5}, "30m 00s"),  # a number is hours, as Ultralytics' time=
    ],
)
def test_a_time_budget_without_phases_is_shared_between_the_stages(budget, finetune, extra, hours, why):
    """rect batches keep one image size: Ultralytics' time= fits each stage's epochs, as before phases existed."""
    p = plan(snapshot((24,)), fake_stats(), Overrides(time=budget, finetune=finetune, extra=extra, rect=True))
    assert {s.name: s.train_args()["time"] for s in p.stages} == pytest.approx(hours)
    assert why in p.reason("time")
    assert "rect batches keep one image size" in p.reason("time")
    assert all(s.schedule is None for s in p.stages)


@pytest.mark.parametrize(
    ("budget", "extra", "seconds"),
    [("20m", (), 1200.0), (0.5, (), 1800.0), (None, (("time", 0.25),), 900.0)],  # hours; Ultralytics' own time=
)
def test_a_time_budget_plans_one_stage_in_phases_to_its_deadline(budget, extra, seconds):
    p = plan(snapshot((24,)), fake_stats(), Overrides(time=budget, extra=extra, model="yolov8n.pt", phases="auto"))
    (stage,) = p.stages  # the fine-tune is the last phase
    assert stage.schedule is not None
    assert stage.schedule.budget_s == seconds
    assert [ph.imgsz for ph in stage.schedule.phases] == [320, 416, 640]
    assert stage.imgsz == 640  # validated and scored at the final size
    args = stage.train_args()
    assert "time" not in args  # the phases keep their own deadline; Ultralytics' time= would refit the epochs
    assert args["warmup_epochs"] == 0
    assert args["close_mosaic"] == 0
    assert args["patience"] == 0
    assert "320 px for 50%" in p.reason("time")
    assert "lr x" in p.reason("time")
    assert "linear" in p.reason("cos_lr")
    assert "Budgeted Training" in p.reason("cos_lr")
    assert "pretrained" in p.reason("warmup_epochs")
    assert "last phase" in p.reason("finetune")


@pytest.mark.parametrize(
    ("phases", "sizes", "shares"),
    [
        ("416,640", (416, 640), (0.7, 0.3)),
        ("416", (416,), (1.0,)),
        ("320, 480, 800", (320, 480, 800), (0.5, 0.3, 0.2)),
        ("416:0.5,640:0.5", (416, 640), (0.5, 0.5)),
    ],
)
def test_the_phases_can_be_given(phases, sizes, shares):
    p = plan(snapshot((24,)), fake_stats(), Overrides(time="30m", phases=phases))
    schedule = p.stages[0].schedule
    assert schedule is not None
    assert tuple(ph.imgsz for ph in schedule.phases) == sizes
    assert tuple(ph.share for ph in schedule.phases) == shares
    assert p.stages[0].imgsz == sizes[-1]  # scored at the last phase's size
    assert "set by user (--phases)" in p.reason("time")


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"phases": "416,640"}, "give --time too"),
        ({"time": "1h", "phases": "640,416"}, "rising image sizes"),
        ({"time": "1h", "phases": "400,640"}, "multiples of 32"),
        ({"time": "1h", "phases": "big"}, "rising image sizes"),
        ({"time": "1h", "phases": "224,320,416,640"}, "at most 3 phases"),
        ({"time": "1h", "phases": "416:0.5,640"}, "give every phase a share"),
        ({"time": "1h", "phases": "416:0.5,640:0.7"}, "together 1"),
        ({"time": "1h", "phases": "416,640", "rect": True}, "with rect batches keep one image size a run cannot"),
    ],
)
def test_impossible_phases_are_one_line(overrides, says):
    with pytest.raises(UsageError, match=says):
        plan(snapshot((24,)), fake_stats(), Overrides(**overrides))


def test_epochs_given_with_a_time_budget_are_said_not_to_apply():
    p = plan(snapshot((24,)), fake_stats(), Overrides(time="1h", epochs=1, phases="auto"))
    assert any("--epochs" in w and "fitted to the deadline" in w for w in p.warnings)
    assert not plan(snapshot((24,)), fake_stats(), Overrides(time="1h", phases="auto")).warnings


def test_epochs_given_with_one_size_under_a_time_budget_are_its_limit():
    one = plan(snapshot((24,)), fake_stats(), Overrides(time="1h", epochs=5, finetune="yes", finetune_epochs=2))
    assert [(s.name, s.max_epochs) for s in one.stages] == [("main", 5), ("finetune", 2)]
    assert "at most 5 epochs with --time, fewer where the budget ends first" in one.reason("epochs")
    assert "the fine-tune at most 2 epochs" in one.reason("finetune")
    assert not one.warnings
    assert "max_epochs" not in one.stages[0].train_args()  # a limit speedtrain keeps, not an Ultralytics argument
    free = plan(snapshot((24,)), fake_stats(), Overrides(time="1h", finetune="yes"))
    assert [s.max_epochs for s in free.stages] == [None, None]
    assert "refits them to the budget" in free.reason("epochs")


def test_a_time_budget_plans_batch_and_cache_for_the_largest_phase():
    hw = snapshot((8,))
    timed = plan(hw, fake_stats(), Overrides(time="1h", phases="auto"))
    untimed = plan(hw, fake_stats(), Overrides(finetune="yes"))
    assert timed.stages[0].batch == untimed.stage("finetune").batch < untimed.stages[0].batch
    assert "planned at 640" in timed.reason("batch")


def test_a_time_budget_from_scratch_warms_up_longer():
    phased = Overrides(time="1h", phases="auto")
    scratch = plan(snapshot((24,)), fake_stats(), replace(phased, model="yolo26n.yaml")).stages[0].schedule
    pretrained = plan(snapshot((24,)), fake_stats(), replace(phased, model="yolo26n.pt")).stages[0].schedule
    assert scratch is not None
    assert pretrained is not None
    assert scratch.warmup > pretrained.warmup


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"rect": True}, "rect batches keep one image size"),
        ({"recipe": "classic"}, "--recipe classic"),
        ({"pipeline": "fast"}, "the fast pipeline decodes the images at one size"),
    ],
)
def test_a_time_budget_keeps_one_size_where_phases_cannot_be(overrides, why):
    p = plan(snapshot((24,)), fake_stats(), Overrides(time="1h", **overrides))
    assert all(s.schedule is None for s in p.stages)
    assert why in p.reason("time")
    with pytest.raises(UsageError, match="a run cannot be trained in phases"):
        plan(snapshot((24,)), fake_stats(), Overrides(time="1h", phases="auto", **overrides))


def test_a_time_budget_trains_one_size_then_640_by_default_and_says_what_it_measured():
    """The measured best in a budget: the main stage at its size with Ultralytics' time= for 70 % of it, then the
    640-px fine-tune for the rest (auto cannot wait to decide: a skipped fine-tune would leave its share unused);
    --finetune no trains one size for the whole budget, and ask, which could be declined, does too."""
    p = plan(snapshot((24,)), fake_stats(), Overrides(time="1h", model="yolov8n.pt"))
    main, then = p.stages
    assert (main.schedule, main.imgsz, then.imgsz, then.when) == (None, planner.MAIN_IMGSZ, 640, "always")
    assert {s.name: s.train_args()["time"] for s in p.stages} == pytest.approx({"main": 0.7, "finetune": 0.3})
    assert "0.31x" in p.reason("time")
    assert "--phases auto" in p.reason("time")
    assert p.reason("finetune").startswith("the last 30% of the budget at 640 px")
    for figure in ("0.483", "0.408", "0.386", "--finetune no"):
        assert figure in p.reason("finetune"), figure
    yes = plan(snapshot((24,)), fake_stats(), Overrides(time="1h", model="yolov8n.pt", finetune="yes"))
    assert [(s.name, s.imgsz, s.train_args()["time"]) for s in yes.stages] == [
        (s.name, s.imgsz, s.train_args()["time"]) for s in p.stages
    ]
    for choice in ("no", "ask"):
        (stage,) = plan(snapshot((24,)), fake_stats(), Overrides(time="1h", model="yolov8n.pt", finetune=choice)).stages
        assert stage.train_args()["time"] == pytest.approx(1.0)
    asked = plan(snapshot((24,)), fake_stats(), Overrides(time="1h", model="yolov8n.pt", finetune="ask"))
    assert asked.reason("finetune").startswith("off with --time (--finetune ask)")
    assert "finetune.batch" not in dict(asked.reasons)


def test_the_classic_recipe_is_the_single_script_exactly_with_its_measured_cost():
    p = plan(snapshot((24,)), fake_stats(), Overrides(recipe="classic"))
    main = p.stages[0]
    assert (main.optimizer, main.lr0, main.rect, main.cos_lr, main.close_mosaic, main.patience) == (
        "Adam",
        0.001,
        True,
        True,
        10,
        10,
    )
    assert "0.111" in p.reason("optimizer")
    assert "0.273" in p.reason("optimizer")
    for key in ("rect", "patience", "close_mosaic"):  # the recipe's own settings say so, not "set by user"
        assert p.reason(key).startswith("--recipe classic"), key
    mine = plan(snapshot((24,)), fake_stats(), Overrides(recipe="classic", patience=30))
    assert mine.stages[0].patience == 30  # what the user sets still wins
    assert mine.reason("patience") == "set by user"


def test_an_unknown_recipe_is_one_line():
    with pytest.raises(UsageError, match="expected speedtrain or classic"):
        plan(snapshot((24,)), fake_stats(), Overrides(recipe="fast"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("budget", "says"), [("30s", "between 1 minute"), ("soon", "a duration such as"), (-1, "between 1 minute")]
)
def test_an_impossible_time_budget_is_refused(budget, says):
    with pytest.raises(UsageError, match=says):
        plan(snapshot((24,)), fake_stats(), Overrides(time=budget))


def test_one_epoch_caches_nothing_since_a_cache_would_load_every_image_before_the_first_batch():
    hw = snapshot((24,))
    one = plan(hw, fake_stats(), Overrides(epochs=1, finetune="yes", finetune_epochs=1))
    assert [s.cache for s in one.stages] == [False, False]
    assert one.reason("cache").startswith("none: one epoch loads each image once either way")
    assert plan(hw, fake_stats(), Overrides(epochs=2)).stages[0].cache == "disk"
    assert plan(hw, fake_stats(), Overrides(epochs=1, cache="ram")).stages[0].cache == "ram"  # the user's word
    assert plan(hw, fake_stats(), Overrides(epochs=1, time="1h")).stages[0].cache == "disk"  # epochs fitted later


def test_the_ram_cache_budget_counts_the_packing_copy_where_the_allocator_is_not_set():
    from speedtrain.planner import RAM_CACHE_FACTOR, RAM_CACHE_FACTOR_UNTUNED, ram_cache_need_gb

    stats = fake_stats(20000, 2000, size=(1920, 1440))  # not pre-resized: .npy files would be 21x the cache
    glibc, other = snapshot(ram=64.0), snapshot(ram=64.0, libc="")
    decoded = stats.decoded_gb(416)
    assert ram_cache_need_gb(glibc, stats, 416, 0, 0) == pytest.approx(decoded * RAM_CACHE_FACTOR + 2.0)
    assert ram_cache_need_gb(other, stats, 416, 0, 0) == pytest.approx(decoded * RAM_CACHE_FACTOR_UNTUNED + 2.0)
    assert f"x{RAM_CACHE_FACTOR_UNTUNED}" in plan(other, stats, Overrides(prepare="no")).reason("cache")


def test_a_pre_resized_copy_is_cached_on_disk_where_later_runs_reuse_it():
    """.npy files of images at about the training size: kept between runs (a second run's first batch at once),
    held by the operating system's page cache, not by the process; the RAM rule decides where they would be large."""
    hw = snapshot((24,), ram=64.0)
    copy = plan(hw, fake_stats(), Overrides(finetune="no"))  # 640x480 photos: pre-resized to 416
    assert copy.prepare_size == 416
    assert copy.stages[0].cache == "disk"
    assert copy.stages[0].ram_cache_need_gb == 0.0
    npy = fake_stats().stored_gb(416)
    assert npy == pytest.approx(fake_stats().decoded_gb(416))  # the copy's images are at the training size
    assert copy.reason("cache").startswith(f"disk: {npy:.2f} GB of decoded images (at most 416 px, the pre-resized")
    assert "kept between runs" in copy.reason("cache")
    assert "no image decoding once the .npy files exist" in dict(copy.estimates)["cache"]
    with_finetune = plan(hw, fake_stats(), Overrides(finetune="yes"))  # a 640 copy under a 416 stage: 2.4x
    assert [s.cache for s in with_finetune.stages] == ["disk", "disk"]
    assert plan(hw, fake_stats(size=(1920, 1440)), Overrides(prepare="no")).stages[0].cache == "ram"  # 21x
    assert plan(snapshot((24,), ram=64.0, disk=1.2), fake_stats(), Overrides()).stages[0].cache == "ram"  # no room
    assert plan(hw, fake_stats(), Overrides(cache="ram")).stages[0].cache == "ram"


def _main(own: float | None, at_640: float | None) -> StageResult:
    scores = tuple((size, v) for size, v in ((416, own), (640, at_640)) if v is not None)
    return StageResult("main", "completed", 416, 16, 50, 50, scores=scores)


@pytest.mark.parametrize(
    ("own", "at_640", "target", "runs"),
    [
        (0.40, 0.30, None, True),  # the weights lose a quarter at 640: fine-tune
        (0.40, 0.385, None, False),  # within 5 %: they carry over
        (0.40, 0.45, None, False),  # better at 640 than at 416
        (0.40, 0.30, 0.25, False),  # --target-map reached at 640 already
        (0.40, 0.30, 0.35, True),
        (None, 0.30, None, True),  # nothing to compare: the plan's stage runs
        (0.40, None, None, True),  # e.g. several ranks, where 640 is not validated
        (0.0, 0.0, None, False),  # nothing learned: nothing to refine
    ],
)
def test_finetune_auto_decides_by_the_loss_at_the_larger_size(own, at_640, target, runs):
    why = planner.finetune_skip_reason(_main(own, at_640), 640, target)
    assert (why == "") is runs, why
