"""A TCP proxy whose behaviour can be switched at any moment: how the fault tests make PostgreSQL or Redis
die, stall or cut connections without touching the real servers (which other tests share).

Put it between a client and a server (``TcpProxy(("127.0.0.1", 5432))``, then point the client at
``proxy.port``) and switch its :class:`Mode`:

* ``forward``: bytes flow both ways, as if the proxy were not there.
* ``refuse``: a dead server. The listening socket is closed (new connections are refused) and every
  existing connection is reset (RST), so clients see "connection refused" / "connection reset". The port
  stays reserved by a bound, non-listening socket: no other program's ``bind(0)`` can take it (and
  answer in the dead server's place) before the proxy listens there again.
* ``freeze``: a stalled server or a network partition. Every socket stays open, nothing is forwarded in
  either direction (nor connection closes); new connections are accepted but not connected upstream.
  Clients block until their own timeouts fire. Back to ``forward``, the held bytes flow again.
* ``drop``: a middlebox that kills connections. Every existing connection is reset, and so is every
  new one as soon as it is accepted; the port keeps accepting. (``reset_connections()`` cuts the current
  connections once without changing the mode.)

The sockets are served by an asyncio loop in a daemon thread, so a test can drive load from other threads
while it flips modes. A mode change returns only once it is in effect (connections reset, listener
closed or reopened), which keeps the tests deterministic.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

#: Longest a mode change or a shutdown may take before the caller gets a TimeoutError.
CONTROL_TIMEOUT_S = 10.0
_CHUNK = 64 * 1024
#: SO_LINGER on, 0 s: close() sends RST instead of FIN, which is what a crashed server looks like.
_LINGER_RESET = struct.pack("ii", 1, 0)


class Mode(enum.StrEnum):
    """How the proxy treats connections (see the module docstring)."""

    FORWARD = "forward"
    REFUSE = "refuse"
    FREEZE = "freeze"
    DROP = "drop"


@dataclass(frozen=True)
class ProxyStats:
    """Counters since the proxy started (a snapshot; take another to see later changes)."""

    #: Client connections accepted.
    accepted: int
    #: Client connections open now.
    active: int
    #: Connections the proxy reset: by ``refuse``, ``drop`` or ``reset_connections()``.
    reset: int
    #: Connections whose upstream could not be reached (they are reset too, but not counted in ``reset``).
    upstream_failures: int
    #: Bytes forwarded client -> upstream and upstream -> client.
    bytes_up: int
    bytes_down: int


@dataclass(eq=False)
class _Link:
    """One client connection and, once connected, its upstream connection."""

    client: asyncio.StreamWriter
    task: asyncio.Task[None] | None
    upstream: asyncio.StreamWriter | None = None
    pumps: list[asyncio.Task[None]] = field(default_factory=list)


def _reserve(host: str, port: int) -> socket.socket | None:
    """A socket bound to ``(host, port)`` that never listens: the port refuses connections and stays
    ours (None if the bind fails, e.g. another socket already holds the port: it is refused anyway)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        return None
    return sock


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close a connection abruptly (RST), whatever is buffered."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


class TcpProxy:
    """A switchable TCP proxy on ``host:port`` (a free port by default) in front of ``upstream``.

    Use it as a context manager, or call :meth:`close`; it listens as soon as it is constructed.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.upstream = upstream
        self.host = host
        self.connect_timeout_s = connect_timeout_s
        self._port = port
        self._mode = Mode.FORWARD
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        #: While refusing: a socket bound to the port without listening (connects get RST, the port
        #: cannot be handed to anyone else).
        self._reserved: socket.socket | None = None
        self._accepted = self._reset_count = self._upstream_failures = 0
        self._bytes = {"up": 0, "down": 0}
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()  # set while forwarding; bound to self._loop when first awaited
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._thread.start()
        try:
            self._call(self._start())
        except BaseException:
            self._stop_loop()
            raise

    # --- public API (any thread)
    @property
    def port(self) -> int:
        """The port clients connect to (stable across ``refuse`` -> ``forward``)."""
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self._port

    @property
    def mode(self) -> Mode:
        return self._mode

    def set_mode(self, mode: Mode | str) -> None:
        """Switch to ``mode``; returns once it is in effect."""
        self._call(self._apply(Mode(mode)))

    def forward(self) -> None:
        self.set_mode(Mode.FORWARD)

    def refuse(self) -> None:
        self.set_mode(Mode.REFUSE)

    def freeze(self) -> None:
        self.set_mode(Mode.FREEZE)

    def drop(self) -> None:
        self.set_mode(Mode.DROP)

    def reset_connections(self) -> int:
        """Reset every current connection once, keeping the mode; returns how many were reset."""
        return self._call(self._reset_all())

    def stats(self) -> ProxyStats:
        return self._call(self._snapshot())

    def close(self) -> None:
        """Stop listening, reset every connection and stop the thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._shutdown())
        finally:
            self._stop_loop()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _exc: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        upstream = f"{self.upstream[0]}:{self.upstream[1]}"
        return f"TcpProxy({self.host}:{self._port} -> {upstream}, {self._mode})"

    # --- inside the loop thread
    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._closed and not self._loop.is_running():
            coroutine.close()
            raise RuntimeError("the proxy is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(CONTROL_TIMEOUT_S)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()

    async def _start(self) -> None:
        self._flowing.set()
        await self._listen()

    async def _listen(self) -> None:
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None
        # reuse_address: the port is bound again after `refuse` although its old connections linger.
        self._server = await asyncio.start_server(self._handle, self.host, self._port, reuse_address=True)
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def _unlisten(self) -> None:
        if self._server is not None:
            self._server.close()  # stops accepting; the connections are handled by _reset_all
            self._server = None
            if not self._closed:
                self._reserved = _reserve(self.host, self._port)

    async def _apply(self, mode: Mode) -> None:
        if self._closed:
            raise RuntimeError("the proxy is closed")
        self._mode = mode
        if mode is Mode.REFUSE:
            await self._unlisten()
            await self._reset_all()
            return
        if self._server is None:
            await self._listen()
        if mode is Mode.FREEZE:
            self._flowing.clear()
            return
        if mode is Mode.DROP:
            await self._reset_all()
        self._flowing.set()

    async def _reset_all(self) -> int:
        links = list(self._links)
        for link in links:
            self._reset_link(link)
        self._reset_count += len(links)
        await asyncio.sleep(0)  # let the aborted transports close before the caller goes on
        return len(links)

    def _reset_link(self, link: _Link) -> None:
        _reset(link.client)
        _reset(link.upstream)
        for task in (*link.pumps, link.task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        self._links.discard(link)

    async def _snapshot(self) -> ProxyStats:
        return ProxyStats(
            accepted=self._accepted,
            active=len(self._links),
            reset=self._reset_count,
            upstream_failures=self._upstream_failures,
            bytes_up=self._bytes["up"],
            bytes_down=self._bytes["down"],
        )

    async def _shutdown(self) -> None:
        await self._unlisten()
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None
        for link in list(self._links):
            self._reset_link(link)
        await asyncio.sleep(0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer, asyncio.current_task())
        self._links.add(link)
        self._accepted += 1
        try:
            # REFUSE too: a connection accepted just before the listener closed, whose handler runs only
            # now, must not get through to a "dead" server (a race the Redis outage test once hit).
            if self._mode in (Mode.DROP, Mode.REFUSE):
                self._reset_count += 1
                self._reset_link(link)
                return
            await self._flowing.wait()  # frozen: the client waits, as on a stalled server
            try:
                upstream_reader, link.upstream = await asyncio.wait_for(
                    asyncio.open_connection(*self.upstream), self.connect_timeout_s
                )
            except (OSError, TimeoutError):
                self._upstream_failures += 1
                self._reset_link(link)
                return
            if self._mode in (Mode.DROP, Mode.REFUSE):  # switched while connecting upstream
                self._reset_count += 1
                self._reset_link(link)
                return
            link.pumps = [
                asyncio.create_task(self._pump(reader, link.upstream, "up", link)),
                asyncio.create_task(self._pump(upstream_reader, writer, "down", link)),
            ]
            await asyncio.gather(*link.pumps, return_exceptions=True)
        except asyncio.CancelledError:
            pass  # reset by a mode change: the transports are already aborted
        finally:
            if link in self._links:
                self._links.discard(link)
                for side in (writer, link.upstream):
                    if side is not None:
                        side.close()

    async def _pump(
        self, source: asyncio.StreamReader, target: asyncio.StreamWriter, direction: str, link: _Link
    ) -> None:
        """Copy one direction until EOF; hold everything (bytes and EOF) while frozen."""
        try:
            while True:
                await self._flowing.wait()
                data = await source.read(_CHUNK)
                await self._flowing.wait()  # bytes read just before a freeze wait for the thaw
                if not data:
                    if target.can_write_eof():
                        target.write_eof()  # half-close, as TCP does end to end
                    return
                target.write(data)
                self._bytes[direction] += len(data)
                await target.drain()
        except (ConnectionError, OSError):
            # One side broke: break the other one too, as a real connection would.
            if link in self._links:
                self._reset_link(link)
