"""`llmarket models …`, `run` and `hardware` through the CLI, offline, with the real default model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from node.cli.main import main
from node.models.default import DEFAULT_MODEL_CID

pytestmark = pytest.mark.slow


def test_models_add_ls_verify_rm(tmp_path, capsys, default_model_file):
    home = ["--data-dir", str(tmp_path / "home")]
    assert main([*home, "models", "add", str(default_model_file), "--name", "smol"]) == 0
    assert capsys.readouterr().out.strip() == DEFAULT_MODEL_CID
    assert main([*home, "models", "ls", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["cid"] == DEFAULT_MODEL_CID and listed["name"] == "smol" and listed["size"] == 98_362_432
    assert main([*home, "models", "ls"]) == 0
    assert "smol" in capsys.readouterr().out
    assert main([*home, "models", "verify", DEFAULT_MODEL_CID]) == 0
    assert "matches its CID" in capsys.readouterr().out
    assert main([*home, "models", "rm", DEFAULT_MODEL_CID]) == 0
    assert capsys.readouterr().out.startswith(f"removed {DEFAULT_MODEL_CID} (smol, 98.4 MB)")
    assert main([*home, "models", "ls", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_models_add_pins_on_the_daemon(tmp_path, capsys, default_model_file, ipfs_daemon):
    home = ["--data-dir", str(tmp_path / "home")]
    assert main([*home, "models", "add", str(default_model_file), "--ipfs-api", ipfs_daemon.api_url]) == 0
    assert capsys.readouterr().out.strip() == DEFAULT_MODEL_CID
    # another node, with an empty cache, fetches it from the daemon by CID
    other = ["--data-dir", str(tmp_path / "other")]
    assert main([*other, "models", "fetch", DEFAULT_MODEL_CID, "--ipfs-api", ipfs_daemon.api_multiaddr, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == f"IPFS daemon at {ipfs_daemon.api_multiaddr}"


def test_models_errors_are_one_line(tmp_path, capsys):
    home = ["--data-dir", str(tmp_path / "home")]
    not_gguf = tmp_path / "readme.txt"
    not_gguf.write_text("hi")
    cases = [
        (["models", "add", str(not_gguf)], "is not a GGUF model"),
        (["models", "fetch", "bafyNOPE"], "invalid CID"),
        (["models", "fetch", DEFAULT_MODEL_CID], "no source is configured; pass --ipfs-api"),
        (["models", "rm", DEFAULT_MODEL_CID], "is not in the cache"),
        (["run", "--temperature", "-2", "hi"], "temperature must be between 0 and 10"),
        (["run", "--model", "nonsense", "hi"], "is not 'default', a CID"),
    ]
    for argv, message in cases:
        assert main([*home, *argv]) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)


def test_run_streams_an_answer_offline(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "node", "--data-dir", str(tmp_path / "home"), "run",
         "--temperature", "0", "--max-tokens", "24", "--seed", "1", "What is the capital of France?"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "prompt +" in result.stderr and "completion tokens" in result.stderr and "finish:" in result.stderr
    # the default model was cached on the way, under its CID
    assert (tmp_path / "home" / "models" / DEFAULT_MODEL_CID / "model").stat().st_size == 98_362_432


def test_hardware_bench_json(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path / "home"), "hardware", "--bench", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["hardware"]["cpu_cores"] >= 1 and info["hardware"]["ram_total"] > 0
    assert info["model"]["cid"] == DEFAULT_MODEL_CID and info["model"]["tokens_per_s"] > 0
