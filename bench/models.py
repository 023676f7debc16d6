"""Model store throughput on the default model (98 MB), against a real IPFS daemon.

    .venv/bin/python bench/models.py [--runs 5]

Measures, each as the median of --runs:
- computing the CID locally (CIDv0 and CIDv1), MB/s;
- a raw `cat` of the file from the daemon's RPC API (bytes read and dropped), MB/s;
- a verified fetch into an empty cache (`ModelStore.fetch`: dag/export, every block
  checked against its CID as it arrives, file written, CID recomputed, fsync), MB/s;
and the ratio verified/raw (target: ≥ 80%). Both transfers hit the same daemon in the
same run, alternating, so machine noise affects both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.dev.ipfsd import IpfsDaemon  # noqa: E402
from node.models.cid import file_cid  # noqa: E402
from node.models.default import DEFAULT_MODEL_CID, default_model_file  # noqa: E402
from node.models.ipfs import IpfsSource  # noqa: E402
from node.models.store import ModelStore  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    path = default_model_file()
    size_mb = path.stat().st_size / 1e6

    def cid(version):
        with open(path, "rb") as f:
            file_cid(f, version)

    cid_v0 = [timed(lambda: cid(0)) for _ in range(args.runs)]
    cid_v1 = [timed(lambda: cid(1)) for _ in range(args.runs)]

    with IpfsDaemon.start() as daemon:
        with open(path, "rb") as f:
            added = requests.post(
                f"{daemon.api_url}/api/v0/add",
                params={"cid-version": "1", "raw-leaves": "true", "cid-base": "base32"},
                files={"file": (path.name, f, "application/octet-stream")},
                timeout=300,
            ).json()["Hash"]
        assert added == DEFAULT_MODEL_CID, added

        def raw_cat():
            with requests.post(f"{daemon.api_url}/api/v0/cat", params={"arg": added}, stream=True, timeout=60) as r:
                r.raise_for_status()
                for _ in r.iter_content(1 << 20):
                    pass

        def verified_fetch():
            with tempfile.TemporaryDirectory() as tmp:
                ModelStore(Path(tmp), [IpfsSource(daemon.api_url)]).fetch(added)

        raw, verified = [], []
        for _ in range(args.runs):
            raw.append(timed(raw_cat))
            verified.append(timed(verified_fetch))

    def rate(times):
        return size_mb / statistics.median(times)

    print(f"file: {path.name}, {size_mb:.1f} MB, median of {args.runs} runs")
    print("| measurement | MB/s |")
    print("|---|---:|")
    print(f"| CID computation, CIDv0 | {rate(cid_v0):,.0f} |")
    print(f"| CID computation, CIDv1 | {rate(cid_v1):,.0f} |")
    print(f"| raw `cat` from the daemon | {rate(raw):,.0f} |")
    print(f"| verified fetch into the cache | {rate(verified):,.0f} |")
    print(f"\nverified fetch / raw cat = {rate(verified) / rate(raw):.0%} (target ≥ 80%)")


if __name__ == "__main__":
    main()
