"""Workers sharing one machine: each notes its llama.cpp threads, and one that would oversubscribe the cores says
so at start (node/app/worker.py, "Workers sharing a machine")."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import trio

from node.app.config import WorkerConfig
from node.app.worker import RunningWorker, crowding_warning, noting_threads, running_workers, runtime_dir, serve


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    path = tmp_path / "run"
    path.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(path))
    return path / "llmarket" / "workers"


def test_the_warning_says_what_to_do_only_when_the_cores_are_oversubscribed():
    assert crowding_warning(8, 4, [RunningWorker(11, 4, "a")]) == ""
    assert crowding_warning(8, 8, []) == ""  # alone, every core is its own
    line = crowding_warning(8, 8, [RunningWorker(11, 8, "a"), RunningWorker(12, 2, "b")])
    assert "\n" not in line
    assert "2 other llama.cpp worker(s) on this machine (pid 11, 12) use 10 thread(s)" in line
    assert "18 on 8 cores" in line and "start each with --threads 2 (the cores divided among the 3 workers)" in line
    assert "--threads 1 " in crowding_warning(2, 2, [RunningWorker(11, 2, "a"), RunningWorker(12, 2, "b")])


async def test_notes_are_seen_while_held_and_gone_after_and_dead_ones_are_swept(run_dir, tmp_path):
    assert runtime_dir() == run_dir
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir.mkdir(parents=True)
    (run_dir / f"{dead.pid}-0.json").write_text(json.dumps({"pid": dead.pid, "threads": 8, "data_dir": "x"}))
    reused = run_dir / f"{os.getpid()}-1.json"  # our pid, but another process's start time: a pid reused
    reused.write_text(json.dumps({"pid": os.getpid(), "started": "1", "threads": 8, "data_dir": "y"}))
    (run_dir / "9-half.json").write_text("{")  # being written: skipped, left alone
    with trio.fail_after(10):
        async with noting_threads(3, tmp_path / "a") as first:
            assert first == []
            assert not (run_dir / f"{dead.pid}-0.json").exists() and not reused.exists()
            async with noting_threads(5, tmp_path / "b") as second:
                assert second == [RunningWorker(os.getpid(), 3, str(tmp_path / "a"))]
                assert sorted(w.threads for w in running_workers(run_dir)) == [3, 5]
            assert [w.threads for w in running_workers(run_dir)] == [3]
    assert running_workers(run_dir) == [] and (run_dir / "9-half.json").exists()


@pytest.mark.slow
async def test_a_second_worker_warns_when_its_threads_and_the_firsts_exceed_the_cores(run_dir, tmp_path):
    cores = os.cpu_count() or 1
    config = lambda name, threads: WorkerConfig(  # noqa: E731
        data_dir=tmp_path / name, threads=threads, slots=1, advertise_interval_s=60
    )
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            first = await nursery.start(serve, config("one", cores))
            assert first.crowding == ""
            second = await nursery.start(serve, config("two", cores))  # the old default: every core, each
            assert f"1 other llama.cpp worker(s) on this machine (pid {os.getpid()}) use {cores} thread(s)" in (
                second.crowding
            )
            assert f"--threads {max(1, cores // 2)} " in second.crowding
            nursery.cancel_scope.cancel()
        async with trio.open_nursery() as nursery:  # shared as `testnet up` shares them: no warning
            first = await nursery.start(serve, config("one", max(1, cores // 2)))
            second = await nursery.start(serve, config("two", max(1, cores // 2)))
            assert (first.crowding, second.crowding) == ("", "") or cores == 1
            nursery.cancel_scope.cancel()
    assert running_workers(run_dir) == []
