"""An IPFS daemon as a model source, through its kubo RPC API (``ipfshttpclient``).

Fetching exports the CID's block DAG as a CAR stream (``dag/export``) and feeds
every block to a ``DagAssembler``, which verifies it against its CID before a
byte of it is written. The daemon is trusted for nothing but availability.

``ipfshttpclient.connect()`` refuses daemons newer than 0.8.0, so the client is
constructed directly (as its own docstring allows). Every request has a
timeout: a dead daemon is an error, never a hang.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import ipfshttpclient
import ipfshttpclient.exceptions as ipfs_errors

from node.errors import ModelError
from node.models.car import read_car
from node.models.cid import CID, parse_cid
from node.models.dag import DagAssembler
from node.progress import NO_PROGRESS, Progress


def api_multiaddr(api: str) -> str:
    """Accept the API as a multiaddr (``/ip4/127.0.0.1/tcp/5001/http``) or a URL (``http://127.0.0.1:5001``)."""
    if api.startswith("/"):
        return api
    parts = urlsplit(api if "://" in api else f"http://{api}")
    if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
        raise ModelError(f"IPFS API address {api!r} is neither a multiaddr nor an http://host:port URL")
    proto = "ip6" if ":" in parts.hostname else ("ip4" if parts.hostname.replace(".", "").isdigit() else "dns")
    return f"/{proto}/{parts.hostname}/tcp/{parts.port}/{parts.scheme}"


class IpfsSource:
    """Fetch models from (and add them to) an IPFS daemon.

    Args:
        api: the daemon's RPC API, as a multiaddr or URL.
        timeout_s: how long any one request may wait for the daemon (connect, or the next bytes).
    """

    def __init__(self, api: str, *, timeout_s: float = 30.0) -> None:
        self.api = api
        self.timeout_s = timeout_s
        self.name = f"IPFS daemon at {api}"
        self._addr = api_multiaddr(api)

    def _client(self) -> ipfshttpclient.Client:
        try:
            return ipfshttpclient.Client(self._addr, timeout=self.timeout_s)
        except ipfs_errors.AddressError as err:
            raise ModelError(f"bad IPFS API address {self.api!r}: {err}") from None

    def _error(self, err: Exception, cid: str) -> ModelError:
        if isinstance(err, ipfs_errors.ConnectionError):
            return ModelError(f"no IPFS daemon answers at {self.api}; start one (`ipfs daemon`) or fix --ipfs-api")
        if isinstance(err, ipfs_errors.TimeoutError):
            return ModelError(f"{self.name} sent nothing for {cid} within {self.timeout_s:.0f}s (does it have it?)")
        if isinstance(err, ipfs_errors.ErrorResponse):
            return ModelError(f"{self.name} refused {cid}: {err}")
        return ModelError(f"{self.name} failed on {cid}: {err}")

    def fetch(self, cid: CID, fd: int, progress: Progress = NO_PROGRESS) -> int:
        """Write the file named by ``cid`` into ``fd``, verifying every block; returns its size.

        Raises:
            ModelError: the daemon is unreachable, silent, or sent a block that fails verification.
        """
        assembler = DagAssembler(cid, fd, self.name)
        started = False
        try:
            with self._client() as client:
                for block_cid, block in read_car(client.dag.export(str(cid), stream=True)):
                    assembler.feed(block_cid, block)
                    if not started and assembler.size is not None:
                        progress.start(assembler.size, f"fetching {str(cid)[:16]}… from IPFS")
                        started = True
                    progress.advance(len(block))
        except ipfs_errors.Error as err:
            raise self._error(err, str(cid)) from None
        return assembler.finish()

    def add(self, path: Path, *, cid_version: int = 1) -> str:
        """Add and pin a file on the daemon (kubo's default chunking and layout); returns the CID it reports."""
        options: dict = {"cid_version": cid_version, "pin": True}
        if cid_version == 1:
            options.update(raw_leaves=True, opts={"cid-base": "base32"})
        try:
            with self._client() as client:
                result = client.add(str(path), **options)
        except ipfs_errors.Error as err:
            raise self._error(err, str(path)) from None
        return str(parse_cid(result["Hash"]))
