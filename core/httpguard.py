"""The lock on dagfusion's HTTP surfaces: host, origin and token checks as pure ASGI middleware.

A local web server is reachable from every page the user's browser opens. Three checks keep
such pages out, in this order, on every ``http`` and ``websocket`` request:

1. **Host.** The ``Host`` header must name this server: ``127.0.0.1:PORT``, ``localhost:PORT``
   or ``[::1]:PORT`` when it is bound to loopback, the bound name when it is bound to one, and
   for a wildcard bind (``0.0.0.0``, ``::``) those, the machine's own names and any IP address.
   A DNS-rebinding page sends its own name (``Host: evil.example:PORT``) and is refused.
2. **Origin.** An ``Origin`` header, when there is one, must be the origin of the request's own
   host (``http://`` + ``Host``), or one of ``extra_origins``. ``Origin: null`` is refused. A
   cross-site form or ``fetch`` — which a browser sends without a preflight when its content
   type is ``text/plain`` — is refused before anything runs.
3. **Token.** Every request carries the per-launch secret (:func:`new_token`): in the
   ``Authorization: Bearer`` header, the ``X-Dagfusion-Token`` header, or the HttpOnly,
   ``SameSite=Strict`` cookie this middleware sets. A ``GET`` whose query string carries
   ``token=…`` (the address printed at start) is answered with that cookie and a redirect to the
   same address without the token, so the token does not stay in the address bar; the page's
   own requests then carry the cookie. No path is exempt. Tokens are compared with
   :func:`hmac.compare_digest`.

A request failing a check is answered ``403`` with a one-line plain-text reason (a websocket is
closed with code 1008 before it is accepted), and no ``Access-Control-Allow-*`` header: the
wrapped application — and its CORS handling — never sees it. ``max_body_bytes`` also caps
request bodies (``413``), from ``Content-Length`` before reading and by counting otherwise.

The middleware depends on no web framework: wrap any ASGI application, or add it to a
Starlette/FastAPI app with ``app.add_middleware(HttpGuard, policy=policy)`` (added last, it runs
first). Lifespan messages pass through.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Host names accepted on a loopback bind (IPv6 in brackets, as in a ``Host`` header).
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
#: Query parameter carrying the token in the printed address.
TOKEN_QUERY = "token"
#: Header carrying the token (besides ``Authorization: Bearer``).
TOKEN_HEADER = "x-dagfusion-token"
#: Websocket close code for a refused connection (policy violation).
WS_POLICY_VIOLATION = 1008

_WILDCARDS = ("", "0.0.0.0", "::", "[::]")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def new_token() -> str:
    """A fresh per-launch secret: 32 random bytes, URL-safe base64."""
    return secrets.token_urlsafe(32)


def _unbracket(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(_unbracket(host))
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` listens on loopback only (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() == "localhost":
        return True
    address = _ip(host)
    return address is not None and address.is_loopback


def is_wildcard(host: str) -> bool:
    """Whether binding ``host`` listens on every interface (``0.0.0.0``, ``::``)."""
    return host in _WILDCARDS


def host_name(host: str) -> str:
    """``host`` as written in a ``Host`` header: lower case, IPv6 addresses in brackets."""
    host = host.strip().lower()
    address = _ip(host)
    if address is not None and address.version == 6:
        return f"[{address.compressed}]"
    return str(address) if address is not None else host


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def split_host(value: str, default_port: int) -> tuple[str, int] | None:
    """``(name, port)`` of a ``Host`` header value (or an origin's authority); ``None`` if malformed."""
    value = value.strip().lower()
    if not value or any(c in value for c in "/\\@?#"):
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[: end + 1], value[end + 1 :]
        if _ip(name) is None:
            return None
    else:
        name, sep, port_text = value.partition(":")
        rest = sep + port_text
    if not rest:
        return host_name(name), default_port
    if not rest.startswith(":") or not _digits(rest[1:]):
        return None
    port = int(rest[1:])
    return (host_name(name), port) if 0 < port < 65536 else None


@dataclass(frozen=True)
class GuardPolicy:
    """What :class:`HttpGuard` accepts: host names and port, origins, the token, body size.

    Build one with :meth:`for_bind`. ``any_ip_host`` accepts any IP-address ``Host`` (a
    wildcard bind: such a host cannot be a rebinding name). ``cookie_name`` includes the port,
    since browsers share cookies between the ports of one host.
    """

    token: str
    port: int
    hosts: frozenset[str]
    any_ip_host: bool = False
    scheme: str = "http"
    extra_origins: frozenset[str] = frozenset()
    max_body_bytes: int | None = None
    cookie_name: str = field(default="")

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError("the guard needs a non-empty token")
        if not self.cookie_name:
            object.__setattr__(self, "cookie_name", f"dagfusion-token-{self.port}")

    @classmethod
    def for_bind(
        cls,
        host: str,
        port: int,
        *,
        token: str | None = None,
        extra_hosts: Iterable[str] = (),
        extra_origins: Iterable[str] = (),
        scheme: str = "http",
        max_body_bytes: int | None = None,
    ) -> GuardPolicy:
        """The policy of a server bound to ``host``:``port`` (see the module docstring for the
        host names each kind of bind accepts); a new token unless one is given."""
        if is_wildcard(host):
            names = {*LOOPBACK_NAMES, socket.gethostname(), socket.getfqdn()}
        elif is_loopback(host):
            names = {*LOOPBACK_NAMES, host}
        else:
            names = {host}
        names.update(extra_hosts)
        return cls(
            token=token or new_token(),
            port=port,
            hosts=frozenset(host_name(n) for n in names if n),
            any_ip_host=is_wildcard(host),
            scheme=scheme,
            extra_origins=frozenset(o.strip().lower().rstrip("/") for o in extra_origins),
            max_body_bytes=max_body_bytes,
        )

    # --- the checks --------------------------------------------------------------------------

    def host_allowed(self, value: str) -> bool:
        """Whether a ``Host`` header value names this server."""
        parsed = split_host(value, _DEFAULT_PORTS.get(self.scheme, 80))
        if parsed is None or parsed[1] != self.port:
            return False
        name = parsed[0]
        return name in self.hosts or (self.any_ip_host and _ip(name) is not None)

    def origin_allowed(self, origin: str, host: str) -> bool:
        """Whether an ``Origin`` header value is this server's own origin for ``host`` (the
        request's already-checked ``Host``), or one of ``extra_origins``."""
        origin = origin.strip().lower()
        if origin in self.extra_origins:
            return True
        scheme, sep, authority = origin.partition("://")
        if not sep or scheme != self.scheme:
            return False
        default = _DEFAULT_PORTS.get(scheme, 80)
        mine = split_host(host, default)
        theirs = split_host(authority, default)
        return mine is not None and mine == theirs

    def token_matches(self, candidate: str | bytes | None) -> bool:
        """Whether ``candidate`` is the token (constant-time comparison)."""
        if not candidate:
            return False
        given = candidate if isinstance(candidate, bytes) else candidate.encode("utf-8", "surrogateescape")
        return hmac.compare_digest(given, self.token.encode("ascii"))

    # --- what the server prints ----------------------------------------------------------

    def url(self, host: str, path: str = "/") -> str:
        """The address to open: ``scheme://host:port/path?token=…``."""
        name = host_name(host)
        if is_wildcard(host):
            name = "127.0.0.1"
        default = _DEFAULT_PORTS.get(self.scheme)
        authority = name if self.port == default else f"{name}:{self.port}"
        return f"{self.scheme}://{authority}{path}?{urlencode({TOKEN_QUERY: self.token})}"

    def cookie(self) -> str:
        """The ``Set-Cookie`` value carrying the token."""
        secure = "; Secure" if self.scheme == "https" else ""
        return f"{self.cookie_name}={self.token}; Path=/; HttpOnly; SameSite=Strict{secure}"


# --- the decision, apart from the ASGI plumbing ------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What to do with a request: let it through (``status`` 0), refuse it (``status`` and
    ``reason``), or redirect it to ``location`` while setting the token cookie."""

    status: int = 0
    reason: str = ""
    location: str | None = None

    @property
    def allowed(self) -> bool:
        return self.status == 0


ALLOW = Verdict()


def _headers(scope: Scope) -> dict[str, list[bytes]]:
    found: dict[str, list[bytes]] = {}
    for name, value in scope.get("headers") or ():
        found.setdefault(name.decode("latin-1").lower(), []).append(value)
    return found


def _one(headers: dict[str, list[bytes]], name: str) -> str | None | bool:
    """The header's value; ``None`` when absent; ``False`` when repeated."""
    values = headers.get(name)
    if not values:
        return None
    if len(values) > 1:
        return False
    return values[0].decode("latin-1")


def _cookie(headers: dict[str, list[bytes]], name: str) -> bytes | None:
    for line in headers.get("cookie", ()):
        for part in line.split(b";"):
            key, sep, value = part.strip().partition(b"=")
            if sep and key.decode("latin-1") == name:
                return value.strip().strip(b'"')
    return None


def _bearer(headers: dict[str, list[bytes]]) -> bytes | None:
    for value in headers.get("authorization", ()):
        kind, _, credential = value.strip().partition(b" ")
        if kind.lower() == b"bearer":
            return credential.strip()
    return None


def decide(policy: GuardPolicy, scope: Scope) -> Verdict:
    """The :class:`Verdict` on one ``http`` or ``websocket`` request ``scope``."""
    headers = _headers(scope)
    host = _one(headers, "host")
    if not isinstance(host, str) or not policy.host_allowed(host):
        return Verdict(403, "this server answers only to its own address (Host header refused)")
    origin = _one(headers, "origin")
    if origin is False or (isinstance(origin, str) and not policy.origin_allowed(origin, host)):
        return Verdict(403, "cross-origin requests are refused (Origin header refused)")
    query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    given = [value for key, value in query if key == TOKEN_QUERY]
    if given and scope["type"] == "http" and scope.get("method") in ("GET", "HEAD"):
        if not policy.token_matches(given[-1]):
            return Verdict(403, "wrong access token: open the address the server printed when it started")
        rest = urlencode([(k, v) for k, v in query if k != TOKEN_QUERY])
        return Verdict(303, location=_local_path(scope) + (f"?{rest}" if rest else ""))
    carried = (*headers.get(TOKEN_HEADER, ())[:1], _bearer(headers), _cookie(headers, policy.cookie_name))
    if not any(policy.token_matches(candidate) for candidate in carried):
        return Verdict(403, "missing or wrong access token: open the address the server printed when it started")
    return ALLOW


def _local_path(scope: Scope) -> str:
    """The request's path, URL-encoded, as a same-server redirect target (never ``//host``)."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if isinstance(raw, bytes) else quote(str(scope.get("root_path", "")) + str(scope.get("path", "/")))
    return "/" + path.lstrip("/")


# --- the middleware ------------------------------------------------------------------------------


class HttpGuard:
    """ASGI middleware applying :func:`decide` (and the body cap) before ``app`` sees a request."""

    def __init__(self, app: ASGIApp, policy: GuardPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        verdict = decide(self.policy, scope)
        if kind == "websocket":
            if verdict.allowed:
                await self.app(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION, "reason": verdict.reason[:120]})
            return
        if verdict.location is not None:
            cookie = [(b"location", verdict.location.encode("latin-1")), (b"set-cookie", self.policy.cookie().encode("latin-1"))]
            await _respond(send, verdict.status, "", cookie)
            return
        if not verdict.allowed:
            await _respond(send, verdict.status, verdict.reason)
            return
        limit = self.policy.max_body_bytes
        if limit is None:
            await self.app(scope, receive, send)
            return
        await _capped(self.app, scope, receive, send, limit)


async def _respond(send: Send, status: int, text: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = (text + "\n").encode("utf-8") if text else b""
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _capped(app: ASGIApp, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    """Run ``app`` with a request body of at most ``limit`` bytes, else answer ``413``."""
    too_large = f"the request body is larger than {limit} bytes"
    declared = _one(_headers(scope), "content-length")
    if declared is False or (isinstance(declared, str) and not _digits(declared.strip())):
        await _respond(send, 400, "malformed Content-Length")
        return
    if isinstance(declared, str) and int(declared) > limit:
        await _respond(send, 413, too_large)
        return
    seen = 0
    exceeded = started = False

    async def counted_receive() -> Message:
        nonlocal seen, exceeded
        message = await receive()
        if message.get("type") == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                exceeded = True
                return {"type": "http.disconnect"}  # the app stops reading; it is answered 413 below
        return message

    async def guarded_send(message: Message) -> None:
        nonlocal started
        if exceeded:
            return
        started = started or message.get("type") == "http.response.start"
        await send(message)

    try:
        await app(scope, counted_receive, guarded_send)
    except Exception:
        if not exceeded:
            raise
    if exceeded and not started:
        await _respond(send, 413, too_large)


__all__ = [
    "ALLOW",
    "GuardPolicy",
    "HttpGuard",
    "LOOPBACK_NAMES",
    "TOKEN_HEADER",
    "TOKEN_QUERY",
    "Verdict",
    "decide",
    "host_name",
    "is_loopback",
    "is_wildcard",
    "new_token",
    "split_host",
]
