"""An IPFS daemon as a model source, through its kubo RPC API (``ipfshttpclient``).

It provides the two primitives of ``node.models.dag.BlockSource``: one block
(``block/get``) and the file's bytes (``cat``). ``fetch_verified`` checks every
block against its CID before a byte of it is written, so the daemon is trusted
for nothing but availability. (``cat`` rather than ``dag/export``: the same
bytes, but measured 25% faster on js-ipfs; see docs/benchmarks.md.)

``ipfshttpclient.connect()`` refuses daemons newer than 0.8.0, so the client is
constructed directly (as its own docstring allows). Every request has a
timeout: a dead daemon is an error, never a hang.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import ipfshttpclient
import ipfshttpclient.exceptions as ipfs_errors

from node.errors import ModelError
from node.models.cid import CID, parse_cid


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

    def get_block(self, cid: CID) -> bytes:
        try:
            with self._client() as client:
                return client.block.get(str(cid))
        except ipfs_errors.Error as err:
            raise self._error(err, str(cid)) from None

    def cat(self, cid: CID) -> Iterator[bytes]:
        try:
            with self._client() as client:
                yield from client.cat(str(cid), stream=True)
        except ipfs_errors.Error as err:
            raise self._error(err, str(cid)) from None

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
