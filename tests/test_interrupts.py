"""Ctrl-C and SIGTERM during a stage (interrupts.py), with real signals to this process: what the first asks for,
what a second or a relayed one does, a stop before the first epoch, a forked DataLoader worker. The whole sequence
through a stage and --resume: test_recovery.py (scripted) and test_reliability.py (real processes)."""

from __future__ import annotations

import os
import signal

import pytest

from speedtrain import interrupts, ultra
from speedtrain.errors import Terminated


def test_ctrl_c_in_a_forked_dataloader_worker_is_ignored():
    """A terminal's Ctrl-C reaches the whole process group, DataLoader workers included (forked, so they inherit
    speedtrain's handler): a worker must keep running, and only the training process asks to stop."""
    import multiprocessing

    recorder, lines = ultra.Recorder(starts={0: 0.0}), []  # the first epoch has begun

    def worker(queue):
        os.kill(os.getpid(), signal.SIGINT)  # twice: a second Ctrl-C would raise KeyboardInterrupt in the owner
        os.kill(os.getpid(), signal.SIGINT)
        queue.put(recorder.stop_requested)

    with interrupts.graceful_stop(recorder, lines.append):
        queue = multiprocessing.get_context("fork").Queue()
        child = multiprocessing.get_context("fork").Process(target=worker, args=(queue,))
        child.start()
        child.join(timeout=30)
        assert child.exitcode == 0  # the worker survived both signals
        assert queue.get(timeout=5) is False  # and did not take the request for itself
        assert lines == []  # nor printed the stop message once per worker
        os.kill(os.getpid(), signal.SIGINT)  # the training process itself: the first Ctrl-C asks to stop
        assert recorder.stop_requested
        assert len(lines) == 1
        assert "stopping after this epoch is saved" in lines[0]


@pytest.mark.parametrize(
    ("sig", "says"),
    [
        ("SIGINT", "Ctrl-C: stopping after this epoch is saved"),
        ("SIGTERM", "SIGTERM (preempted?): stopping after this epoch is saved; go on with --resume"),
    ],
)
def test_the_stop_message_promises_only_what_happens(sig, says):

    recorder, lines = ultra.Recorder(starts={0: 0.0}), []  # the first epoch has begun
    before = {s: signal.getsignal(s) for s in interrupts.GRACEFUL_SIGNALS}
    with interrupts.graceful_stop(recorder, lines.append):
        os.kill(os.getpid(), getattr(signal, sig))
        assert recorder.stop_requested
        assert recorder.stop_signal == sig
    assert len(lines) == 1
    assert says in lines[0]
    assert {s: signal.getsignal(s) for s in interrupts.GRACEFUL_SIGNALS} == before  # handlers given back


@pytest.mark.parametrize(
    ("sig", "raised", "says"),
    [
        ("SIGINT", KeyboardInterrupt, "Ctrl-C before the first epoch"),
        ("SIGTERM", Terminated, "SIGTERM before the first epoch"),
    ],
)
def test_a_stop_before_the_first_epoch_means_now(sig, raised, says):
    """During a label scan, a cache filling or Ultralytics' setup (minutes at 100,000 images) there is no epoch to
    save: the first Ctrl-C or SIGTERM stops at once, saying so, and gives the handlers back."""

    recorder, lines = ultra.Recorder(), []
    before = {s: signal.getsignal(s) for s in interrupts.GRACEFUL_SIGNALS}
    with pytest.raises(raised), interrupts.graceful_stop(recorder, lines.append):
        os.kill(os.getpid(), getattr(signal, sig))
    assert len(lines) == 1
    assert says in lines[0]
    assert "stopping now" in lines[0]
    assert {s: signal.getsignal(s) for s in interrupts.GRACEFUL_SIGNALS} == before


def test_a_relayed_signal_is_the_same_request_and_a_later_one_stops_at_once(monkeypatch):
    """SLURM signals every process of a job step, and torchrun passes the signal on to its ranks as well: a copy
    within RELAY_S is the same request; a second Ctrl-C after that stops at once."""

    recorder, lines = ultra.Recorder(starts={0: 0.0}), []  # the first epoch has begun
    with interrupts.graceful_stop(recorder, lines.append):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher's copy: no KeyboardInterrupt
        assert recorder.stop_requested
        assert len(lines) == 1
        monkeypatch.setattr(interrupts, "RELAY_S", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
