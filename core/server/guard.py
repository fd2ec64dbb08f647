"""The job server's outer ASGI layers: :class:`~dagfusion.httpguard.HttpGuard`, with
``GET /health`` answered without the token, and every refusal as a JSON problem.

:func:`guarded` wraps the API application in, from the outside in: :class:`JsonRefusals`
(turns the guard's one-line plain-text refusals — 400, 403, 413 — into
``application/problem+json`` bodies naming the field), :class:`HealthWithoutToken` (``GET`` or
``HEAD /health`` still needs an allowed ``Host`` and ``Origin`` but no token) and the guard.
"""

from __future__ import annotations

import json
from typing import Any

from dagfusion.httpguard import ASGIApp, GuardPolicy, HttpGuard, Receive, Scope, Send

HEALTH_PATH = "/health"


def _header(scope: Scope, name: bytes) -> list[str]:
    return [v.decode("latin-1") for k, v in scope.get("headers") or () if k.lower() == name]


class HealthWithoutToken:
    """Lets ``GET``/``HEAD /health`` reach ``app`` with an allowed Host and Origin but no token;
    every other request goes through ``guarded``."""

    def __init__(self, app: ASGIApp, guarded: ASGIApp, policy: GuardPolicy) -> None:
        self.app = app
        self.guarded = guarded
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") == "http" and scope.get("path") == HEALTH_PATH and scope.get("method") in ("GET", "HEAD"):
            hosts, origins = _header(scope, b"host"), _header(scope, b"origin")
            if (
                len(hosts) == 1
                and self.policy.host_allowed(hosts[0])
                and len(origins) <= 1
                and all(self.policy.origin_allowed(o, hosts[0]) for o in origins)
            ):
                await self.app(scope, receive, send)
                return
        await self.guarded(scope, receive, send)


def _field(status: int, text: str) -> str | None:
    lowered = text.lower()
    if status == 413:
        return "body"
    if "content-length" in lowered:
        return "Content-Length"
    if "host header" in lowered:
        return "Host"
    if "origin header" in lowered:
        return "Origin"
    if "token" in lowered:
        return "token"
    return None


class JsonRefusals:
    """Rewrites plain-text error responses (``status`` ≥ 400) as JSON problem bodies."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        pending: dict[str, Any] | None = None
        chunks: list[bytes] = []

        async def rewrite(message: Any) -> None:
            nonlocal pending
            if message["type"] == "http.response.start" and message.get("status", 200) >= 400:
                content_type = dict((k.lower(), v) for k, v in message.get("headers", ())).get(b"content-type", b"")
                if content_type.startswith(b"text/plain"):
                    pending = dict(message)
                    return
            if pending is not None and message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                status = int(pending["status"])
                text = b"".join(chunks).decode("utf-8", "replace").strip()
                body = json.dumps(
                    {"type": "about:blank", "title": text or "refused", "status": status, "detail": text,
                     "field": _field(status, text)}
                ).encode("utf-8")
                headers = [(k, v) for k, v in pending.get("headers", ()) if k.lower() not in (b"content-type", b"content-length")]
                headers += [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]
                await send({**pending, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                pending = None
                return
            await send(message)

        await self.app(scope, receive, rewrite)


def guarded(app: ASGIApp, policy: GuardPolicy) -> ASGIApp:
    """``app`` behind the guard, with the health exemption and JSON refusals (see the module)."""
    return JsonRefusals(HealthWithoutToken(app, HttpGuard(app, policy), policy))


__all__ = ["HEALTH_PATH", "HealthWithoutToken", "JsonRefusals", "guarded"]
