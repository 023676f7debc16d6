"""The contracts shipped in the package are exactly what solc makes of contracts/ today."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from node.payments.artifacts import CONTRACTS, export_fields, load_artifact, load_build_artifact

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", CONTRACTS)
def test_packaged_artifact_matches_a_fresh_compile(name, brownie_build):
    fresh = export_fields(load_build_artifact(brownie_build, name))
    shipped = json.loads(resources.files("node.payments").joinpath("artifacts", f"{name}.json").read_text())
    assert fresh["compiler"]["version"].startswith("0.8.37+commit.")
    assert shipped == fresh, f"node/payments/artifacts/{name}.json is stale: run scripts/export-artifacts and commit"
    assert load_artifact(name).bytecode == "0x" + fresh["bytecode"]
