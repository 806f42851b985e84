"""The fault-injection proxy against a tiny local echo server: each mode does what the fault tests rely on.

Every wait is bounded: a read expected to get nothing gives up after ``QUIET_S``, one expected to get
bytes after ``LOUD_S``.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from decision_platform.devtools.tcp_proxy import Mode, TcpProxy

QUIET_S = 0.3
LOUD_S = 3.0


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(4096):
                self.request.sendall(data)
        except ConnectionError:  # the proxy resets connections on purpose
            pass


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = _EchoServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.server_address[0], server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(LOUD_S)


@pytest.fixture
def proxy(echo: tuple[str, int]) -> Iterator[TcpProxy]:
    with TcpProxy(echo) as tcp_proxy:
        yield tcp_proxy


def connect(proxy: TcpProxy) -> socket.socket:
    return socket.create_connection(proxy.address, timeout=LOUD_S)


def roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    return receive(sock, len(payload))


def receive(sock: socket.socket, size: int, timeout: float = LOUD_S) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def assert_silent(sock: socket.socket) -> None:
    """Nothing arrives (and the connection is not closed) within QUIET_S."""
    sock.settimeout(QUIET_S)
    with pytest.raises(TimeoutError):
        sock.recv(1)


def assert_reset(sock: socket.socket) -> None:
    """The connection was closed abruptly (RST), as by a crashed server, not by a clean FIN."""
    sock.settimeout(LOUD_S)
    with pytest.raises(ConnectionResetError):
        sock.sendall(b"x")
        sock.recv(1)


def assert_reset_on_connect(proxy: TcpProxy) -> None:
    """A new connection is reset at once: so fast that connect() itself may already see the RST."""
    try:
        sock = connect(proxy)
    except ConnectionResetError:
        return
    with sock:
        assert_reset(sock)


def test_forward_passes_bytes_both_ways_and_counts_them(proxy: TcpProxy) -> None:
    with connect(proxy) as sock:
        assert roundtrip(sock, b"hello") == b"hello"
        assert roundtrip(sock, b"x" * 200_000) == b"x" * 200_000  # more than one chunk
        stats = proxy.stats()
    assert (stats.accepted, stats.active, stats.reset) == (1, 1, 0)
    assert stats.bytes_up == stats.bytes_down == 200_005
    assert proxy.mode is Mode.FORWARD


def test_refuse_resets_open_connections_and_refuses_new_ones_until_forward(proxy: TcpProxy) -> None:
    port = proxy.port
    with connect(proxy) as sock:
        assert roundtrip(sock, b"a") == b"a"
        proxy.refuse()
        assert_reset(sock)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy.address, timeout=LOUD_S)
    assert proxy.stats().reset == 1
    # The port stays reserved while refused: no other listener can take it and answer instead.
    with socket.socket() as squatter, pytest.raises(OSError):
        squatter.bind(proxy.address)

    proxy.forward()
    assert proxy.port == port  # clients keep their configured address
    with connect(proxy) as sock:
        assert roundtrip(sock, b"back") == b"back"


def test_freeze_holds_bytes_both_ways_then_delivers_them_on_forward(proxy: TcpProxy) -> None:
    with connect(proxy) as before:
        assert roundtrip(before, b"1") == b"1"
        proxy.freeze()
        before.sendall(b"held")
        assert_silent(before)
        # A connection opened during the freeze is accepted but answers nothing either.
        with connect(proxy) as during:
            during.sendall(b"new")
            assert_silent(during)
            assert proxy.stats().active == 2
            proxy.forward()
            assert receive(during, 3) == b"new"
        assert receive(before, 4) == b"held"
    assert proxy.stats().reset == 0


def test_freeze_holds_a_close_too(echo: tuple[str, int]) -> None:
    """An upstream that goes away during a freeze is not seen to close before the thaw."""
    upstream = socket.create_server(("127.0.0.1", 0))
    with TcpProxy(upstream.getsockname()) as proxy, connect(proxy) as sock:
        accepted, _ = upstream.accept()
        proxy.freeze()
        accepted.close()
        upstream.close()
        assert_silent(sock)
        proxy.forward()
        assert receive(sock, 1) == b""  # now the EOF arrives


def test_drop_resets_connections_and_every_new_one_while_accepting(proxy: TcpProxy) -> None:
    with connect(proxy) as sock:
        assert roundtrip(sock, b"a") == b"a"
        proxy.drop()
        assert_reset(sock)
    assert_reset_on_connect(proxy)  # the port still accepts, and resets at once
    assert proxy.stats().reset == 2
    proxy.forward()
    with connect(proxy) as sock:
        assert roundtrip(sock, b"ok") == b"ok"


def test_reset_connections_cuts_current_connections_once(proxy: TcpProxy) -> None:
    with connect(proxy) as first, connect(proxy) as second:
        assert roundtrip(first, b"1") == b"1"
        assert roundtrip(second, b"2") == b"2"
        assert proxy.reset_connections() == 2
        assert_reset(first)
        assert_reset(second)
    assert proxy.mode is Mode.FORWARD
    with connect(proxy) as sock:
        assert roundtrip(sock, b"3") == b"3"


def test_unreachable_upstream_resets_the_client_and_is_counted() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        dead = probe.getsockname()  # nothing listens there once closed
    with TcpProxy(dead) as proxy:
        assert_reset_on_connect(proxy)
        assert proxy.stats().upstream_failures == 1


def test_close_releases_the_port_and_is_idempotent(echo: tuple[str, int]) -> None:
    proxy = TcpProxy(echo)
    sock = connect(proxy)
    assert roundtrip(sock, b"x") == b"x"
    proxy.close()
    proxy.close()
    assert_reset(sock)
    sock.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy.address, timeout=LOUD_S)
    with pytest.raises(RuntimeError):
        proxy.forward()
