"""Hardware profile, refusals for models that will not fit, and the progress bar."""

from __future__ import annotations

import io
import socket
import threading

import pytest
import trio

import node.inference.engine as engine_module
import node.inference.hardware as hardware_module
from node.errors import ModelError
from node.inference.engine import open_engine
from node.inference.hardware import Gpu, HardwareProfile, nvml_gpus, probe_hardware
from node.models.cid import parse_cid
from node.models.default import DEFAULT_MODEL_CID
from node.models.ipfs import IpfsSource
from node.progress import TerminalProgress


def test_probe_reports_this_machine():
    profile = probe_hardware()
    assert profile.cpu_cores >= 1 and profile.ram_total >= profile.ram_available > 0
    assert profile.cpu_model
    assert profile.gpus == nvml_gpus()  # empty without an NVIDIA driver, real GPUs with one
    assert "cores" in profile.summary()


def _machine(ram_available: int, gpus=()) -> HardwareProfile:
    return HardwareProfile("test CPU", 2, 2 * ram_available, ram_available, tuple(gpus), gpu_offload=bool(gpus))


async def test_a_model_too_big_for_ram_is_refused(monkeypatch, default_model_file):
    monkeypatch.setattr(engine_module, "probe_hardware", lambda: _machine(ram_available=50_000_000))
    with pytest.raises(ModelError, match=r"does not fit in the 0.0 GiB of free RAM; use a smaller model"):
        async with open_engine(default_model_file, gpu_layers=0, threads=1):
            pass


async def test_a_model_too_big_for_vram_is_refused(monkeypatch, default_model_file):
    tiny_gpu = Gpu("Tiny GPU", vram_total=64 * 2**20, vram_free=32 * 2**20)
    monkeypatch.setattr(engine_module, "probe_hardware", lambda: _machine(2**34, [tiny_gpu]))
    with pytest.raises(ModelError, match=r"does not fit in the GPU's free memory .* --gpu-layers N"):
        async with open_engine(default_model_file, gpu_layers=-1, threads=1):
            pass


@pytest.mark.slow
async def test_open_engine_probes_the_hardware_once_off_the_event_loop(monkeypatch, default_model_file):
    """NVML and llama.cpp's GPU check run once per engine, in a thread, never on trio's thread."""
    calls = []

    def on_trio_thread() -> bool:
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            return False
        return True

    def counted(name, real):
        def probe():
            calls.append((name, on_trio_thread()))
            return real()

        monkeypatch.setattr(hardware_module, name, probe)

    counted("nvml_gpus", hardware_module.nvml_gpus)
    counted("llama_gpu_offload", hardware_module.llama_gpu_offload)
    counted("_meminfo", hardware_module._meminfo)
    async with open_engine(default_model_file, n_ctx=512) as engine:
        assert sorted(calls) == [("_meminfo", False), ("llama_gpu_offload", False), ("nvml_gpus", False)]
        profile = engine.hardware
        assert engine.gpu_layers == (-1 if profile.gpu_offload and profile.gpus else 0)
        assert engine.threads == profile.cpu_cores  # one slot: every core


def test_progress_bar_draws_on_a_terminal_only():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        bar = TerminalProgress(stream, interval_s=0)
        bar.start(1000, "fetching")
        bar.advance(500)
        bar.finish()
    assert "\r" in tty.getvalue() and " 50%" in tty.getvalue() and "100%" not in tty.getvalue()
    assert pipe.getvalue() == ""


def test_a_silent_daemon_times_out_with_a_clear_error(tmp_path):
    """A listener that accepts connections but never answers must not hang a fetch."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        source = IpfsSource(f"http://127.0.0.1:{server.getsockname()[1]}", timeout_s=1)
        with pytest.raises(ModelError, match=r"sent nothing for .* within 1s"):
            source.get_block(parse_cid(DEFAULT_MODEL_CID))
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()
