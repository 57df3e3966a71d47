"""The routing HTTP server: where the health/metrics endpoint binds, how a bad address fails, and its bounds
(keep-alive, listen queue, request deadline, connection limit, close)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from stream.config import RuntimeSettings, load
from stream.errors import ConfigError
from stream.runtime import Response, RoutingServer, json_response, start_http
from tests.helpers import serving_in_thread


def test_metrics_bind_loopback_by_default_and_the_image_opens_them() -> None:
    assert load(RuntimeSettings, {}).metrics_host == "127.0.0.1"
    assert load(RuntimeSettings, {"ZEROCF_METRICS_HOST": "0.0.0.0"}).metrics_host == "0.0.0.0"
    server = start_http(0, lambda: (True, {"ok": True}))
    try:
        assert server.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as resp:
            assert resp.status == 200
    finally:
        server.shutdown()
        server.server_close()


def test_a_busy_metrics_port_is_a_config_error_that_names_the_fix() -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=rf"127\.0\.0\.1:{port}.*ZEROCF_METRICS_PORT"):
            start_http(port, lambda: (True, {}))
    finally:
        busy.close()


def test_an_unknown_metrics_interface_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="ZEROCF_METRICS_HOST"):
        start_http(0, lambda: (True, {}), host="203.0.113.7")  # TEST-NET-3: never a local address


# ------------------------------------------------------------------ the routing server under load (issue 11.3)
def _ok(_query: str) -> Response:
    return json_response(200, {"ok": True})


@contextmanager
def serving(**kw: Any) -> Iterator[RoutingServer]:
    with serving_in_thread(RoutingServer(("127.0.0.1", 0), {"/ok": _ok}, **kw)) as srv:
        yield srv


def _get(port: int, path: str = "/ok") -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return resp.status, resp.read()


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """True when the server closes ``sock`` (EOF or reset) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_keep_alive_serves_many_requests_on_one_connection_head_included() -> None:
    """HTTP/1.0 (one connection per request) made every request of a client pay a new connection."""
    with serving() as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        try:
            conn.request("GET", "/ok")
            resp = conn.getresponse()
            assert (resp.status, resp.version, resp.will_close, resp.read()) == (200, 11, False, b'{"ok": true}')
            first = conn.sock
            conn.request("HEAD", "/ok")
            resp = conn.getresponse()
            assert (resp.status, resp.getheader("Content-Length"), resp.read()) == (200, "12", b"")
            conn.request("GET", "/nope")
            resp = conn.getresponse()
            assert resp.status == 404 and b"no such path" in resp.read()
            assert conn.sock is first  # three requests, one connection
        finally:
            conn.close()


def test_a_request_with_a_body_closes_its_connection() -> None:
    """The body is never read, so it must not be parsed as a next request on a kept-alive connection."""
    with serving() as srv, socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"POST /ok HTTP/1.1\r\nHost: t\r\nContent-Length: 18\r\n\r\nGET /ok HTTP/1.1\r\n\r\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
        assert raw.startswith(b"HTTP/1.1 405 ") and b"Connection: close" in raw and raw.count(b"HTTP/1.1") == 1


def test_a_burst_of_connections_waits_in_the_listen_queue() -> None:
    """socketserver's listen backlog of 5 dropped the SYNs of a burst: connects hung for 1-3 s retries."""
    srv = RoutingServer(("127.0.0.1", 0), {"/ok": _ok})
    socks = []
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    try:  # nothing accepts yet: every connection must fit in the listen queue
        for _ in range(100):
            socks.append(socket.create_connection(("127.0.0.1", srv.port), timeout=0.5))
        thread.start()
        for s in socks:
            s.sendall(b"GET /ok HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        for s in socks:
            s.settimeout(5)
            assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
    finally:
        for s in socks:
            s.close()
        if thread.is_alive():
            srv.shutdown()
        srv.server_close()


def test_a_slow_drip_client_is_cut_off_at_the_request_deadline() -> None:
    """A client sending one header line at a time, each within the per-read timeout, held a thread forever.

    Twenty such clients (and one that sends nothing) are closed once ``request_timeout_s`` has passed since
    they connected, however often they send; a normal client is served meanwhile.
    """
    with serving(request_timeout_s=1.0) as srv:
        stop = threading.Event()

        def drip(sock: socket.socket) -> None:
            try:
                sock.sendall(b"GET /ok HTTP/1.1\r\n")
                while not stop.wait(0.2):
                    sock.sendall(b"X-Drip: 1\r\n")
            except OSError:
                pass  # closed by the server: what we want

        slow = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(20)]
        silent = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        threads = [threading.Thread(target=drip, args=(s,), daemon=True) for s in slow]
        for t in threads:
            t.start()
        try:
            assert _get(srv.port) == (200, b'{"ok": true}')
            assert all(_closed_by_server(s, within=4.0) for s in [*slow, silent])
            assert srv.open_connections == 0 or wait_for(lambda: srv.open_connections == 0, 3)
            assert _get(srv.port)[0] == 200
        finally:
            stop.set()
            for s in [*slow, silent]:
                s.close()


def test_connections_beyond_the_limit_get_503_and_are_closed() -> None:
    with serving(max_connections=3) as srv:
        held = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(3)]
        try:
            assert wait_for(lambda: srv.open_connections == 3, 5)
            with pytest.raises(urllib.error.HTTPError) as err:
                _get(srv.port)
            assert err.value.code == 503 and err.value.headers["Retry-After"] == "1"
            assert "3 connections open" in json.loads(err.value.read())["error"]
        finally:
            for s in held:
                s.close()
        assert wait_for(lambda: srv.open_connections == 0, 5)
        assert _get(srv.port)[0] == 200


def test_close_does_not_wait_for_idle_keep_alive_clients() -> None:
    srv = RoutingServer(("127.0.0.1", 0), {"/ok": _ok}, request_timeout_s=60.0)
    srv.daemon_threads, srv.block_on_close = False, True  # as zerocf serve: close joins the handlers
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        conn.request("GET", "/ok")
        assert conn.getresponse().read() == b'{"ok": true}'  # now idle on a kept-alive connection
        srv.shutdown()
        closer = threading.Thread(target=srv.server_close, daemon=True)
        closer.start()
        closer.join(5)
        assert not closer.is_alive(), "server_close waited for an idle keep-alive connection"
    finally:
        conn.close()


def wait_for(cond: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()
