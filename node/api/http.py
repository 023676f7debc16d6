"""Serving an ASGI app with Hypercorn's trio worker, inside the node's trio world: ``gateway`` and ``serve --http``."""

from __future__ import annotations

import hmac
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from node.errors import ConfigError


def bind(listen: str, flag: str = "--listen") -> tuple[Config, Any]:
    """Hypercorn's config and its listening sockets for ``listen`` (HOST:PORT), bound now: a port in use is one
    line before the node joins the market. Raises ``ConfigError``."""
    config = Config()
    config.bind = [listen]
    config.accesslog = None
    config.loglevel = "WARNING"  # callers print where they listen themselves
    try:
        sockets = config.create_sockets()
        for sock in sockets.insecure_sockets:
            sock.listen(config.backlog)
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise ConfigError(f"cannot listen on {listen} ({reason}); choose another {flag} HOST:PORT") from None
    return config, sockets


def authorized(scope: dict, api_key: str | None, *, query_key: str | None = None) -> bool:
    """Whether an ASGI request may pass: no key is set, or it carries ``Authorization: Bearer <api_key>``, or
    (for a page's event stream, which cannot set headers) ``query_key`` is the key. Compared in constant time,
    so the time a wrong key takes says nothing about the right one."""
    if not api_key:
        return True
    want = api_key.encode()
    headers = dict(scope.get("headers") or [])
    if hmac.compare_digest(headers.get(b"authorization", b""), b"Bearer " + want):
        return True
    return query_key is not None and hmac.compare_digest(query_key.encode(), want)


async def lifespan(receive, send) -> None:
    """The ASGI lifespan handshake (Hypercorn sends it first): nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def serve_asgi(app: Any, config: Config, sockets: Any, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on ``sockets`` until cancelled; ``task_status.started`` gets the URLs it is bound to."""
    await worker_serve(wrap_app(app, config.wsgi_max_body_size, "asgi"), config, sockets=sockets,
                       task_status=task_status)  # fmt: skip
