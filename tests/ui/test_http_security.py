"""The canvas's HTTP lock, over real HTTP against a running server: host and origin checks, the
per-launch token (printed address → cookie; headers), CORS, and the size limits on what a
request may ask the server to check or run. The middleware's own cases (websockets, body caps,
redirect targets) are driven through ASGI directly at the end."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from dagfusion.errors import UnsafeOperationError
from dagfusion.httpguard import GuardPolicy, HttpGuard, decide

pytest.importorskip("gradio", reason="the canvas needs the ui extra: pip install 'dagfusion[ui]'")
httpx = pytest.importorskip("httpx")

from dagfusion.ui import app  # noqa: E402  (after the skip: imports Gradio)
from dagfusion.ui.graph import MAX_NODES  # noqa: E402

EVIL = "http://evil.example"
GUARDED = [
    ("GET", "/"),
    ("GET", "/config"),
    ("GET", "/gradio_api/info"),
    ("GET", "/gradio_api/queue/status"),
    ("GET", "/theme.css"),
    ("GET", f"/gradio_api/file={app.STATIC_DIR.as_posix()}/canvas.js"),
    ("POST", "/gradio_api/component_server"),
    ("POST", "/gradio_api/queue/join"),
    ("POST", "/gradio_api/run/predict"),
    ("POST", "/gradio_api/call/predict"),
    ("POST", "/gradio_api/api/predict"),
    ("POST", "/gradio_api/upload"),
]


def client(**kwargs: Any) -> Any:
    return httpx.Client(trust_env=False, timeout=30, **kwargs)  # no proxies from the environment


def canvas_id(served: Any) -> int:
    (canvas,) = [b for b in served.demo.blocks.values() if isinstance(b, app.WorkflowCanvas)]
    return canvas._id


def call(served: Any, fn: str, data: Any, *, headers: dict[str, str] | None = None, http: Any = None) -> Any:
    """POST one server-function call to the component server, the way canvas.js does."""
    body = {"session_hash": "tests", "component_id": canvas_id(served), "fn_name": fn, "data": data}
    with client() as fresh:
        return (http or fresh).post(served.origin + "/gradio_api/component_server", json=body, headers=headers or {})


def token_headers(served: Any) -> dict[str, str]:
    return {"X-Dagfusion-Token": served.server.token}


def refused(response: Any, status: int = 403) -> str:
    assert response.status_code == status, (response.status_code, response.text[:200])
    assert response.headers["content-type"].startswith("text/plain")
    assert "access-control-allow-origin" not in response.headers
    return response.text


def nothing_ran(served: Any) -> None:
    assert served.backend.queue.summary() == []
    assert not (served.work / "outputs").exists()


# --- the token ---------------------------------------------------------------------------------


def test_the_printed_address_sets_a_strict_cookie_and_drops_the_token(served: Any) -> None:
    url = served.server.url
    assert url.startswith(f"http://127.0.0.1:{served.server.port}/?token=") and served.server.token in url
    with client() as http:
        first = http.get(url)
        assert first.status_code == 303 and first.headers["location"] == "/"
        cookie = first.headers["set-cookie"]
        assert cookie.startswith(f"dagfusion-token-{served.server.port}={served.server.token};")
        assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= {part.strip() for part in cookie.split(";")}
        page = http.get(served.origin + "/")
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert http.get(served.origin + "/config").status_code == 200
        checked = call(served, "df_catalog", None, http=http)
        assert checked.status_code == 200 and checked.json()["nodes"]
        # Other query parameters survive the redirect; a redirect never leaves the server.
        kept = http.get(served.origin + "/?view=api&token=" + served.server.token)
        assert kept.status_code == 303 and kept.headers["location"] == "/?view=api"
        far = http.get(served.origin + "//evil.example/x?token=" + served.server.token)
        assert far.status_code == 303 and far.headers["location"].startswith("/evil.example")


@pytest.mark.parametrize(("method", "path"), GUARDED)
def test_every_route_needs_the_token(served: Any, method: str, path: str) -> None:
    with client() as http:
        assert "access token" in refused(http.request(method, served.origin + path))
        wrong = {"X-Dagfusion-Token": "x" * 43, "Authorization": "Bearer nope"}
        refused(http.request(method, served.origin + path, headers=wrong))
        http.cookies.set(f"dagfusion-token-{served.server.port}", "guess")
        refused(http.request(method, served.origin + path))
    nothing_ran(served)


def test_a_wrong_token_in_the_address_sets_no_cookie(served: Any) -> None:
    with client() as http:
        token = served.server.token
        wrong = token[:-1] + ("B" if token.endswith("A") else "A")
        response = http.get(served.origin + "/?token=" + wrong)
        assert "wrong access token" in refused(response) and "set-cookie" not in response.headers
        # A token in the query string of anything but a GET does not count.
        posted = http.post(served.origin + "/gradio_api/component_server?token=" + served.server.token, json={})
        refused(posted)
    nothing_ran(served)


def test_the_token_header_or_bearer_runs_a_check(served: Any, quickstart_yaml: str) -> None:
    graph = served.backend.open_text(quickstart_yaml, "blurred_noise.yaml")["graph"]
    for headers in (token_headers(served), {"Authorization": f"Bearer {served.server.token}"}):
        same_origin = {**headers, "Origin": served.origin}
        response = call(served, "df_check", graph, headers=same_origin)
        assert response.status_code == 200, response.text
        assert response.json() == {"ok": True, "problems": [], "warnings": [], "points": 0}
        assert response.headers.get("access-control-allow-origin") in (None, served.origin)


# --- host and origin ---------------------------------------------------------------------------


def test_a_cross_origin_text_plain_post_never_runs(served: Any, quickstart_yaml: str) -> None:
    """The CSRF: a page elsewhere POSTs text/plain (no preflight) to queue a run."""
    graph = served.backend.open_text(quickstart_yaml, "blurred_noise.yaml")["graph"]
    body = json.dumps({"session_hash": "x", "component_id": canvas_id(served), "fn_name": "df_submit", "data": graph})
    for origin in (EVIL, "null", f"http://127.0.0.1:{served.server.port + 1}", served.origin.replace("http:", "https:")):
        # Even a request that somehow carried the token is refused for its origin.
        for extra in ({}, token_headers(served)):
            headers = {"Origin": origin, "Content-Type": "text/plain", **extra}
            with client() as http:
                response = http.post(served.origin + "/gradio_api/component_server", content=body, headers=headers)
            assert "cross-origin" in refused(response)
    time.sleep(0.2)
    nothing_ran(served)


def test_a_preflight_from_elsewhere_is_refused_without_cors_headers(served: Any) -> None:
    headers = {"Origin": EVIL, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    with client() as http:
        response = http.options(served.origin + "/gradio_api/component_server", headers=headers)
    refused(response)
    assert not any(name.startswith("access-control-") for name in response.headers)


@pytest.mark.parametrize(("method", "path"), [("GET", "/"), ("GET", "/config"), ("POST", "/gradio_api/component_server")])
def test_a_foreign_host_is_refused_even_with_the_token(served: Any, method: str, path: str) -> None:
    """DNS rebinding: the attacker's name resolves to 127.0.0.1; the browser sends that name."""
    port = served.server.port
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", f"127.0.0.1:{port + 1}"):
        for origin in ({}, {"Origin": f"http://{host}"}):
            headers = {"Host": host, **token_headers(served), **origin}
            with client() as http:
                body = {"session_hash": "x", "component_id": canvas_id(served), "fn_name": "df_paths", "data": ""}
                response = http.request(method, served.origin + path, headers=headers, json=body if method == "POST" else None)
            assert "Host header" in refused(response)


def test_the_loopback_names_are_the_servers_own(served: Any) -> None:
    port = served.server.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"):
        headers = {"Host": host, "Origin": f"http://{host.lower()}", **token_headers(served)}
        with client() as http:
            assert http.get(served.origin + "/config", headers=headers).status_code == 200
        response = call(served, "df_paths", "", headers=headers)
        assert response.status_code == 200 and isinstance(response.json(), list)


# --- size limits ---------------------------------------------------------------------------------


def test_a_million_point_sweep_is_refused_at_once(served: Any) -> None:
    graph = {
        "version": 1,
        "nodes": [{"id": "slow", "type": "uitest.Slow", "inputs": {"steps": 1, "delay": 0.0}, "pos": [0, 0]}],
        "links": [],
        "workflow": {"sweep": [{"slow.x": [float(i) for i in range(1000)]}, {"slow.steps": list(range(1, 1001))}]},
    }
    for fn in ("df_check", "df_submit"):
        started = time.perf_counter()
        response = call(served, fn, graph, headers=token_headers(served))
        seconds = time.perf_counter() - started
        assert response.status_code == 200 and seconds < 1.0, (fn, seconds)
        answer = response.json()
        assert answer["ok"] is False
        (problem,) = [p for p in answer["problems"] if p["code"] == "sweep-too-large"]
        assert "1,000,000 runs" in problem["message"] and "at most 10,000" in problem["message"]
    nothing_ran(served)


def test_an_oversized_graph_is_refused_before_any_work(served: Any) -> None:
    nodes = [{"id": f"n{i}", "type": "dagfusion.util.Number", "inputs": {}} for i in range(MAX_NODES + 1)]
    response = call(served, "df_check", {"version": 1, "nodes": nodes, "links": []}, headers=token_headers(served))
    answer = response.json()
    assert answer["ok"] is False and f"{MAX_NODES + 1:,} nodes" in answer["problems"][0]["message"]
    with client() as http:
        huge = http.post(
            served.origin + "/gradio_api/component_server",
            content=b"{" + b" " * (app.MAX_REQUEST_BYTES + 1) + b"}",
            headers={"Content-Type": "application/json", **token_headers(served)},
        )
    assert "larger than" in refused(huge, 413)
    nothing_ran(served)


# --- binding -------------------------------------------------------------------------------------


def test_a_network_address_is_refused_without_allow_remote(served: Any) -> None:
    for host in ("0.0.0.0", "::", "192.0.2.1"):
        with pytest.raises(UnsafeOperationError, match="allow_remote"):
            app.launch(served.demo, host=host, port=0, block=False, quiet=True)


def test_what_each_bind_answers_to() -> None:
    loopback = GuardPolicy.for_bind("127.0.0.1", 8000, token="t")
    assert all(loopback.host_allowed(h) for h in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000"))
    assert not any(loopback.host_allowed(h) for h in ("10.0.0.2:8000", "evil.example:8000", "localhost", "localhost:8001", ""))
    named = GuardPolicy.for_bind("box.lan", 8000, token="t")
    assert named.host_allowed("box.lan:8000") and not named.host_allowed("localhost:8000")
    wildcard = GuardPolicy.for_bind("0.0.0.0", 8000, token="t")
    assert wildcard.host_allowed("10.1.2.3:8000") and wildcard.host_allowed("[fe80::1]:8000") and wildcard.host_allowed("localhost:8000")
    assert not wildcard.host_allowed("evil.example:8000")  # a name could be rebound; an address cannot
    assert wildcard.url("0.0.0.0") == "http://127.0.0.1:8000/?token=t"
    assert GuardPolicy.for_bind("::1", 80, token="t").url("::1") == "http://[::1]/?token=t"
    assert GuardPolicy.for_bind("::1", 80, token="t").host_allowed("[::1]")  # default port


# --- the middleware on its own (ASGI) ----------------------------------------------------------


def _run(guard: HttpGuard, scope: dict[str, Any], body: list[bytes] | None = None) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    chunks = list(body or [b""])

    async def receive() -> dict[str, Any]:
        if scope["type"] == "websocket":
            return {"type": "websocket.connect"}
        chunk = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(dict(message))

    asyncio.run(guard(scope, receive, send))
    return sent


async def _echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.accept"})
        return
    if scope["type"] == "lifespan":
        await send({"type": "lifespan.startup.complete"})
        return
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RuntimeError("client went away")
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


def _scope(kind: str = "http", *, headers: dict[str, str] | None = None, path: str = "/", query: str = "") -> dict[str, Any]:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return {"type": kind, "method": "POST", "path": path, "query_string": query.encode(), "headers": raw, "scheme": "ws" if kind == "websocket" else "http"}


def test_websockets_are_held_to_the_same_checks() -> None:
    policy = GuardPolicy.for_bind("127.0.0.1", 9000, token="secret")
    guard = HttpGuard(_echo, policy)
    cookie = {"Host": "127.0.0.1:9000", "Cookie": f"other=1; {policy.cookie_name}=secret"}
    assert _run(guard, _scope("websocket", headers={**cookie, "Origin": "http://127.0.0.1:9000"})) == [{"type": "websocket.accept"}]
    for headers in (
        {"Host": "127.0.0.1:9000"},  # no token
        {**cookie, "Origin": EVIL},
        {**cookie, "Host": "evil.example:9000"},
    ):
        (closed,) = _run(guard, _scope("websocket", headers=headers))
        assert closed["type"] == "websocket.close" and closed["code"] == 1008
    assert _run(guard, {"type": "lifespan"}) == [{"type": "lifespan.startup.complete"}]


def test_request_bodies_are_capped_declared_or_streamed() -> None:
    policy = GuardPolicy.for_bind("127.0.0.1", 9000, token="secret", max_body_bytes=10)
    guard = HttpGuard(_echo, policy)
    ok = {"Host": "127.0.0.1:9000", "Authorization": "Bearer secret"}
    small = _run(guard, _scope(headers={**ok, "Content-Length": "4"}), [b"abcd"])
    assert small[0]["status"] == 200 and small[1]["body"] == b"4"
    declared = _run(guard, _scope(headers={**ok, "Content-Length": "11"}), [b"x" * 11])
    assert declared[0]["status"] == 413
    malformed = _run(guard, _scope(headers={**ok, "Content-Length": "\u00b2"}), [b"x"])
    assert malformed[0]["status"] == 400
    streamed = _run(guard, _scope(headers=ok), [b"x" * 6, b"x" * 6])
    assert [m["status"] for m in streamed if m["type"] == "http.response.start"] == [413]


def test_decisions_without_a_server() -> None:
    policy = GuardPolicy.for_bind("127.0.0.1", 9000, token="secret")
    ok = {"Host": "127.0.0.1:9000", "X-Dagfusion-Token": "secret"}
    assert decide(policy, _scope(headers=ok)).allowed
    twice = _scope(headers=ok)
    twice["headers"].append((b"origin", b"http://127.0.0.1:9000"))
    twice["headers"].append((b"origin", EVIL.encode()))
    assert decide(policy, twice).status == 403  # two Origin headers
    get = {**_scope(headers={"Host": "localhost:9000"}, path="/x y", query="token=secret"), "method": "GET"}
    verdict = decide(policy, get)
    assert verdict.status == 303 and verdict.location == "/x%20y"
    odd = _scope(headers={**ok, "Host": "127.0.0.1:\uff19\uff10\uff10\uff10"})  # full-width digits
    assert decide(policy, odd).status == 403
    with pytest.raises(ValueError):
        GuardPolicy(token="", port=1, hosts=frozenset())


def test_the_token_is_new_each_launch(served: Any) -> None:
    other = GuardPolicy.for_bind("127.0.0.1", served.server.port)
    assert other.token != served.server.token and len(other.token) >= 43
