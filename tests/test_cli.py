"""The command line: help for every command, one-line errors, and the chain commands on a real anvil."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from node.cli.main import build_parser, main
from node.payments.deployment import write_deployment


def _all_commands(parser, prefix=()):
    yield prefix
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            for name, sub in action.choices.items():
                yield from _all_commands(sub, (*prefix, name))


def test_every_command_has_help(capsys):
    commands = list(_all_commands(build_parser()))
    assert ("chain", "status") in commands and ("models", "add") in commands and ("run",) in commands
    for command in commands:
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--help"])
        assert exit_.value.code == 0
        assert "usage: llmarket" in capsys.readouterr().out


def test_python_dash_m_node_is_the_same_program():
    result = subprocess.run([sys.executable, "-m", "node", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip().startswith("llmarket ")


def test_errors_are_one_line_and_exit_non_zero(capsys, tmp_path):
    assert main(["wallet", "deposit", "1LLM", "--rpc-url", "http://127.0.0.1:9", "--deployments", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmarket: error: no Ethereum JSON-RPC endpoint answers")


def test_unreachable_chain_is_one_line(capsys, tmp_path):
    assert main(["chain", "status", "--rpc-url", "http://127.0.0.1:9", "--deployments", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Ethereum JSON-RPC endpoint answers at http://127.0.0.1:9" in err


@pytest.mark.slow
def test_chain_status(chain, tmp_path, capsys):
    write_deployment(chain.deployment, tmp_path)
    flags = ["--rpc-url", chain.chain.rpc_url, "--deployments", str(tmp_path), "--json"]
    assert main(["chain", "status", *flags]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["chain_id"] == 31337 and status["escrow"]["address"] == chain.deployment.deposits
    assert status["escrow"]["contract"] == "DepositEscrow" and status["escrow"]["unlock_period_s"] == 86_400
    assert status["token"]["symbol"] == "LLM"
    assert main(["chain", "status", *flags[:-1]]) == 0  # the text form
    assert "DepositEscrow, unlock period 86400 s" in capsys.readouterr().out


@pytest.mark.slow
def test_serve_with_a_model_nobody_has_is_one_line(tmp_path):
    """The fetch fails inside serve's nursery: the error arrives wrapped in exception groups, and is still one line."""
    missing = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"  # a valid CID no source has
    result = subprocess.run(
        [sys.executable, "-m", "node", "--data-dir", str(tmp_path), "serve", "--model", missing],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("llmarket: error:")]
    assert len(errors) == 1 and missing in errors[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_ctrl_c_on_serve_is_one_line_and_exit_130(tmp_path):
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "node", "--data-dir", str(tmp_path), "serve", "--ctx-size", "512"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # SIGABRT dumps every thread's stack (a hang's diagnosis)
    )  # fmt: skip
    try:
        assert proc.stdout.readline().startswith("/ip4/")  # serving
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # seen twice in full CI runs, never alone: say where it hangs
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"serve did not stop within 60 s of Ctrl-C; its threads:\n{err[-6000:]}") from None
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.rstrip().endswith("llmarket: interrupted")
