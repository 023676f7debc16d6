"""The market with real processes: `llmarket serve` ×2 and `llmarket request` over TCP, real SmolLM2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from node.inference.engine import SamplingParams, open_engine
from node.models.default import DEFAULT_MODEL_CID

pytestmark = [pytest.mark.slow, pytest.mark.long]

DEADLINE_S = 90


def _wait_for(predicate, what: str, timeout_s: float = DEADLINE_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)  # polling interval
    raise AssertionError(f"timed out waiting for {what}")


class Processes:
    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        out = open(self.root / f"{name}.out", "w")
        err = open(self.root / f"{name}.err", "w")
        cmd = [sys.executable, "-m", "node", "--data-dir", str(self.root / name), *args]
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        return self.procs[name]

    def out(self, name: str) -> str:
        return (self.root / f"{name}.out").read_text()

    def err(self, name: str) -> str:
        return (self.root / f"{name}.err").read_text()

    def worker(self, name: str, *bootstrap: str, extra: tuple[str, ...] = ()) -> str:
        args = ["serve", "--ctx-size", "1024", *extra]
        for addr in bootstrap:
            args += ["--bootstrap", addr]
        self.start(name, *args)

        def address():
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited: {self.err(name)}")
            lines = self.out(name).split()
            return lines[0] if lines else None

        return _wait_for(address, f"{name} to print its multiaddr")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


def test_a_killed_worker_is_replaced_mid_stream(processes):
    first = processes.worker("w1")
    processes.worker("w2", first)
    request = processes.start(
        "req", "request", "--spot-check", "0", "--bootstrap", first, "--temperature", "0", "--max-tokens", "300",
        "Write a long story about a dragon.",
    )  # fmt: skip
    _wait_for(lambda: processes.out("req").strip(), "the answer to start streaming")
    busy = _wait_for(
        lambda: next((w for w in ("w1", "w2") if "accepted" in processes.err(w)), None), "a worker to log the job"
    )
    os.kill(processes.procs[busy].pid, signal.SIGKILL)
    assert request.wait(timeout=DEADLINE_S) == 0, processes.err("req")
    err = processes.err("req")
    assert "continuing on another worker" in err
    survivor = "w2" if busy == "w1" else "w1"
    assert "accepted" in processes.err(survivor)
    assert processes.out("req").strip()
    # usage line: "[N prompt + M completion tokens from A…, B…, finish: …]"
    assert " from " in err and err.count("…,") >= 1


def test_a_greedy_request_equals_the_engines_direct_output(processes, default_model_file):
    first = processes.worker("w1")
    result = subprocess.run(
        [sys.executable, "-m", "node", "--data-dir", str(processes.root / "req"), "request", "--spot-check", "0",
         "--bootstrap", first, "--temperature", "0", "--max-tokens", "40", "--json", "What is the capital of France?"],
        capture_output=True, text=True, timeout=DEADLINE_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)

    async def direct():
        async with open_engine(default_model_file, n_ctx=1024) as engine:
            return await engine.complete_chat(
                [{"role": "user", "content": "What is the capital of France?"}],
                SamplingParams(max_tokens=40, temperature=0.0),
            )

    expected = trio.run(direct)
    assert answer["text"] == expected.text
    assert answer["usage"] == {
        "prompt_tokens": expected.usage.prompt_tokens,
        "completion_tokens": expected.usage.completion_tokens,
    }


def test_a_new_worker_fetches_its_model_from_a_peer(processes):
    first = processes.worker("w1")
    second = processes.worker("w2", first, extra=("--model", DEFAULT_MODEL_CID))  # empty cache, no IPFS daemon
    assert (processes.root / "w2" / "models" / DEFAULT_MODEL_CID / "model").stat().st_size == 98_362_432
    peer = second.rsplit("/p2p/", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "node", "--data-dir", str(processes.root / "req"), "request", "--spot-check", "0",
         "--bootstrap", first, "--peer", peer, "--model", DEFAULT_MODEL_CID, "--temperature", "0",
         "--max-tokens", "8", "--json", "Hi"],
        capture_output=True, text=True, timeout=DEADLINE_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["workers"] == [peer]
