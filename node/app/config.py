"""What a worker is told to be: ``WorkerConfig``, the frozen settings ``serve`` runs from (the CLI builds it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from node.net.host import HostConfig


@dataclass(frozen=True)
class WorkerConfig:
    data_dir: Path
    model: str = "default"
    network: HostConfig = HostConfig()  # listen, bootstrap, announce, mDNS, relaying
    price_per_1k: int = 0
    verify_price_per_1k: int | None = None  # verification jobs; default: price_per_1k // 10
    slots: int | None = None  # None: chosen from the machine (node/inference/hardware.py plan_slots)
    ctx_size: int = 2048
    threads: int | None = None
    gpu_layers: int | None = None
    engine: str = "batched"  # node/inference/batched.py; or "contexts": one llama.cpp context per slot
    ipfs_api: str | None = None
    advertise_interval_s: float = 10.0
    offer_ttl_s: float = 30.0  # three refreshes: a stopped worker's offer is gone within 30 s (spot checks use them)
    peer_discovery_s: float = 15.0  # how long to look for peers holding a model no other source has
    # paid serving (price_per_1k > 0)
    rpc_url: str | None = None
    deployments_dir: Path | None = None
    insecure_dev_key: bool = False
    settle_every: int = 1
    settle_interval_s: float | None = None
    max_credit_window: int | None = None  # default: the price of 256 tokens

    @property
    def verify_price(self) -> int:
        return self.price_per_1k // 10 if self.verify_price_per_1k is None else self.verify_price_per_1k
