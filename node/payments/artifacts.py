"""Compiled contracts shipped inside the package.

A worker installed with pip has no Solidity compiler, so the ABI and creation
bytecode of ``LLMToken`` and ``DepositEscrow`` live in
``node/payments/artifacts/*.json``. They are exported from brownie's build
output by ``scripts/export-artifacts`` and must match a fresh compile exactly;
``tests/test_artifacts.py`` recompiles with real solc and compares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from node.errors import ConfigError

#: The contracts the node talks to, in deployment order.
CONTRACTS = ("LLMToken", "DepositEscrow")

# Fields copied from a brownie build artifact; everything else there (AST,
# source maps, coverage data) is brownie's business.
_EXPORTED_FIELDS = ("contractName", "abi", "bytecode", "deployedBytecode", "compiler", "sourcePath")


@dataclass(frozen=True)
class Artifact:
    """One compiled contract."""

    name: str
    abi: list[dict[str, Any]]
    bytecode: str  # creation code, hex (brownie omits the 0x; it is added here)

    def __post_init__(self) -> None:
        if not self.bytecode.startswith("0x"):
            object.__setattr__(self, "bytecode", "0x" + self.bytecode)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Artifact:
        return cls(name=data["contractName"], abi=data["abi"], bytecode=data["bytecode"])


def load_artifact(name: str) -> Artifact:
    """The packaged artifact of contract ``name`` (one of ``CONTRACTS``)."""
    try:
        text = resources.files("node.payments").joinpath("artifacts", f"{name}.json").read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"no compiled artifact for contract {name!r} in the package; "
            "reinstall llmarket or run scripts/export-artifacts"
        ) from None
    return Artifact.from_json(json.loads(text))


def load_build_artifact(build_dir: Path, name: str) -> dict[str, Any]:
    """Read contract ``name`` from a brownie build directory (``build/contracts``)."""
    path = Path(build_dir) / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist; run `brownie compile` first") from None


def export_fields(build_artifact: dict[str, Any]) -> dict[str, Any]:
    """The part of a brownie build artifact that the package ships."""
    return {key: build_artifact[key] for key in _EXPORTED_FIELDS}


def export_artifacts(build_dir: Path, out_dir: Path) -> list[Path]:
    """Write the shipped artifacts from a brownie build directory; returns the files written."""
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in CONTRACTS:
        path = out_dir / f"{name}.json"
        path.write_text(
            json.dumps(export_fields(load_build_artifact(build_dir, name)), indent=1, sort_keys=True) + "\n"
        )
        written.append(path)
    return written
