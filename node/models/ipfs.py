"""An IPFS daemon as a model source, through its kubo RPC API (``ipfshttpclient``).

It provides the two primitives of ``node.models.dag.BlockSource``: one block
(``block/get``) and the file's bytes (``cat``). ``fetch_verified`` checks every
block against its CID before a byte of it is written, so the daemon is trusted
for nothing but availability. (``cat`` rather than ``dag/export``: the same
bytes, but measured 25% faster on js-ipfs; see docs/benchmarks.md.)

``ipfshttpclient.connect()`` refuses daemons newer than 0.8.0, so the client is
constructed directly (as its own docstring allows). Every request has a
timeout: a dead daemon is an error, never a hang.

``cat`` alone goes through ``requests`` itself, to hand on each piece of the
file as soon as it arrives. ``ipfshttpclient`` streams with
``iter_content(chunk_size=None)``, which for a response with a
``Content-Length`` reads the *whole* body before yielding anything: a daemon
(or a proxy in front of one) that trickles such a body would never trip the
per-read timeout, and the store's minimum rate (``node.models.dag.Pace``),
which looks at what arrives, would never get to look.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import ipfshttpclient
import ipfshttpclient.exceptions as ipfs_errors
import requests
import urllib3

from node.errors import ModelError
from node.models.cid import CHUNK_SIZE, CID, parse_cid


def api_multiaddr(api: str) -> str:
    """Accept the API as a multiaddr (``/ip4/127.0.0.1/tcp/5001/http``) or a URL (``http://127.0.0.1:5001``)."""
    if api.startswith("/"):
        return api
    parts = urlsplit(api if "://" in api else f"http://{api}")
    if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
        raise ModelError(f"IPFS API address {api!r} is neither a multiaddr nor an http://host:port URL")
    proto = "ip6" if ":" in parts.hostname else ("ip4" if parts.hostname.replace(".", "").isdigit() else "dns")
    return f"/{proto}/{parts.hostname}/tcp/{parts.port}/{parts.scheme}"


def api_url(api: str) -> str:
    """The API as an ``http(s)://host:port`` URL (the inverse of ``api_multiaddr``)."""
    parts = api_multiaddr(api).strip("/").split("/")
    if len(parts) != 5 or parts[0] not in ("ip4", "ip6", "dns", "dns4", "dns6") or parts[2] != "tcp":
        raise ModelError(f"IPFS API address {api!r} is not /ip4|ip6|dns/HOST/tcp/PORT/http(s)")
    host = f"[{parts[1]}]" if parts[0] == "ip6" else parts[1]
    if parts[4] not in ("http", "https"):
        raise ModelError(f"IPFS API address {api!r} does not end in /http or /https")
    return f"{parts[4]}://{host}:{parts[3]}"


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
        """The file's bytes, each piece as it arrives (at most one socket read per piece; see the module docstring)."""
        url = f"{api_url(self.api)}/api/v0/cat"
        try:
            reply = requests.post(url, params={"arg": str(cid)}, stream=True, timeout=self.timeout_s)
        except requests.Timeout:
            raise self._error(ipfs_errors.TimeoutError(None), str(cid)) from None
        except requests.ConnectionError:
            raise self._error(ipfs_errors.ConnectionError(None), str(cid)) from None
        with reply:
            if reply.status_code != 200:
                raise ModelError(f"{self.name} refused {cid}: {_error_message(reply)}")
            try:
                while piece := reply.raw.read1(CHUNK_SIZE):
                    yield piece
            except urllib3.exceptions.ReadTimeoutError:
                raise ModelError(f"{self.name} sent nothing more of {cid} for {self.timeout_s:g}s") from None
            except urllib3.exceptions.HTTPError as err:  # a broken connection or body
                raise ModelError(f"{self.name} broke off {cid}: {err}") from None

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


def _error_message(reply: requests.Response) -> str:
    """What a kubo RPC error response says (``{"Message": …}``), else its status."""
    try:
        return str(reply.json()["Message"])[:300]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {reply.status_code}"
