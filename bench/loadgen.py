"""Pure-Python HTTP/1.1 load generator: the fallback when ``wrk`` is not installed.

Run by ``bench_api.py`` as a *separate process* (so its CPU use is visible and it does not share a GIL
with the harness), it keeps ``--concurrency`` keep-alive connections busy for ``--seconds`` in a closed
loop and prints one JSON object with the request count, errors and the latency distribution.

Why raw sockets instead of httpx: an HTTP client library costs ~100-200 µs of Python per request, which
on a 2-core machine is CPU taken from the server under test. A minimal request writer and response
reader on asyncio streams (on uvloop when available) costs a fraction of that. It still competes with
the server for the two cores, which is why the harness reports its CPU use next to the results.

The request bodies are the contract the Lua script ``wrk_scenario.lua`` mirrors: keep them in step.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Scenario names shared with bench_api.py and wrk_scenario.lua.
MODES = ("health", "read", "event")
#: Devices per entity: a small, stable set so distinct-device windows look like real users'.
DEVICES_PER_ENTITY = 4
#: Percentiles reported, in percent.
PERCENTILES = (50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 99.99)


def request_factory(mode: str, host: str, entities: int, run_id: str, seed: int) -> Callable[[], bytes]:
    """A function returning the raw bytes of the next request for ``mode``.

    ``event`` requests carry a unique ``event_id`` (run id + counter) so no event is a duplicate: a
    duplicate is a cheaper no-op in the feature store and would flatter the numbers.
    """
    rng = random.Random(seed)
    if mode == "health":
        raw = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        return lambda: raw
    head = f"POST /decide HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: "
    if mode == "read":

        def read() -> bytes:
            body = f'{{"entity_id":"u{rng.randrange(entities)}"}}'
            return f"{head}{len(body)}\r\n\r\n{body}".encode()

        return read
    if mode == "event":
        counter = 0

        def event() -> bytes:
            nonlocal counter
            counter += 1
            k = rng.randrange(entities)
            device = k * DEVICES_PER_ENTITY + rng.randrange(DEVICES_PER_ENTITY)
            body = (
                f'{{"entity_id":"u{k}","event":{{"event_id":"{run_id}-{counter}",'
                f'"amount":{rng.uniform(1.0, 500.0):.2f},"event_type":"payment",'
                f'"attributes":{{"device_id":"d{device}"}}}}}}'
            )
            return f"{head}{len(body)}\r\n\r\n{body}".encode()

        return event
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


class ProtocolError(Exception):
    """The server's answer was not HTTP/1.1 this reader understands; the connection is dropped."""


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; returns (status, keep_alive). Handles Content-Length and chunked bodies."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise ProtocolError(f"bad status line {lines[0][:80]!r}") from None
    length: int | None = None
    chunked = False
    keep_alive = True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"connection" and value.strip().lower() == b"close":
            keep_alive = False
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length is not None:
        await reader.readexactly(length)
    else:
        raise ProtocolError("response without Content-Length or chunked encoding")
    return status, keep_alive


@dataclass
class Tally:
    """What the workers of one run observed. Latencies in nanoseconds, only for completed requests."""

    latencies_ns: array = field(default_factory=lambda: array("q"))
    ok: int = 0
    status_errors: int = 0
    socket_errors: int = 0
    timeouts: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    #: Raw requests answered 2xx, kept only when asked (``--acked-event-ids``): what the server promised.
    acked: list[bytes] | None = None


def acked_event_ids(requests: list[bytes]) -> list[str]:
    """Event ids of the acknowledged ``event`` requests: bench_outage.py looks each one up in the database."""
    found = (EVENT_ID.search(raw) for raw in requests)
    return [match.group(1).decode() for match in found if match]


EVENT_ID = re.compile(rb'"event_id":"([^"]+)"')


async def worker(
    host: str,
    port: int,
    next_request: Callable[[], bytes],
    deadline: float,
    tally: Tally,
    budget: list[int],
    interval_ns: int = 0,
    first_ns: int = 0,
) -> None:
    """One keep-alive connection: send, wait for the answer, send the next.

    Closed loop when ``interval_ns`` is 0. Otherwise open loop: request ``n`` is *due* at
    ``first_ns + n * interval_ns`` and its latency is counted from that due time, not from when it was
    actually sent, so a server that falls behind is charged for the wait (no coordinated omission).
    """
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    perf_ns = time.perf_counter_ns
    sent = 0
    try:
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            due = 0
            if interval_ns:
                due = first_ns + sent * interval_ns
                sent += 1
                wait_ns = due - perf_ns()
                if wait_ns > 0:
                    await asyncio.sleep(wait_ns / 1e9)
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection(host, port)
                except OSError:
                    tally.socket_errors += 1
                    await asyncio.sleep(0.01)  # do not spin on a refused connection
                    continue
            assert reader is not None
            raw = next_request()
            start = due or perf_ns()
            try:
                writer.write(raw)
                status, keep_alive = await read_response(reader)
            except (
                OSError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ProtocolError,
                ValueError,
            ):
                tally.socket_errors += 1
                writer.close()
                reader = writer = None
                continue
            tally.latencies_ns.append(perf_ns() - start)
            tally.statuses[status] = tally.statuses.get(status, 0) + 1
            if 200 <= status < 300:
                tally.ok += 1
                if tally.acked is not None:
                    tally.acked.append(raw)
            else:
                tally.status_errors += 1
            if not keep_alive:
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()


def percentile(sorted_values: array, q: float) -> float:
    """Nearest-rank percentile (the value at or below which q% of samples fall)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return float(sorted_values[rank - 1])


def summarize(tally: Tally, elapsed_s: float) -> dict[str, Any]:
    """The JSON-able result: same shape as the one bench_api.py builds from wrk's output."""
    values = array("q", sorted(tally.latencies_ns))
    completed = len(values)
    latency_ms: dict[str, float] = {}
    if completed:
        latency_ms = {f"p{q:g}": percentile(values, q) / 1e6 for q in PERCENTILES}
        latency_ms["min"] = values[0] / 1e6
        latency_ms["max"] = values[-1] / 1e6
        latency_ms["mean"] = sum(values) / completed / 1e6
    return {
        "requests": completed,
        "ok": tally.ok,
        "errors": tally.status_errors + tally.socket_errors + tally.timeouts,
        "error_detail": {
            "status": tally.status_errors,
            "socket": tally.socket_errors,
            "timeout": tally.timeouts,
        },
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "duration_s": elapsed_s,
        "rps": completed / elapsed_s if elapsed_s > 0 else 0.0,
        "latency_ms": latency_ms,
    }


async def run(
    host: str,
    port: int,
    mode: str,
    concurrency: int,
    seconds: float,
    entities: int,
    run_id: str,
    seed: int,
    max_requests: int,
    rate: float = 0.0,
    keep_acked: bool = False,
) -> dict[str, Any]:
    """Drive ``concurrency`` connections for ``seconds`` (or ``max_requests``) and summarize.

    With ``rate`` > 0 the connections share a fixed schedule of ``rate`` requests/s in total (open
    loop, each connection offset so the arrivals interleave evenly); otherwise each runs flat out.
    """
    tally = Tally(acked=[] if keep_acked else None)
    budget = [max_requests]
    start = time.perf_counter()
    deadline = start + seconds
    interval_ns = int(concurrency / rate * 1e9) if rate > 0 else 0
    first_ns = time.perf_counter_ns()
    tasks = [
        asyncio.create_task(
            worker(
                host,
                port,
                request_factory(mode, host, entities, f"{run_id}-{i}", seed + i),
                deadline,
                tally,
                budget,
                interval_ns,
                first_ns + i * interval_ns // concurrency,
            )
        )
        for i in range(concurrency)
    ]
    # Requests in flight at the deadline may finish; ones stuck for 10 s more are counted as timeouts.
    _, pending = await asyncio.wait(tasks, timeout=seconds + 10.0)
    for task in pending:
        task.cancel()
        tally.timeouts += 1
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    result = summarize(tally, time.perf_counter() - start)
    result["offered_rps"] = rate if rate > 0 else None
    if tally.acked is not None:
        result["acked_event_ids"] = acked_event_ids(tally.acked)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--entities", type=int, default=1000)
    parser.add_argument("--run-id", default="lg")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-requests", type=int, default=5_000_000, help="hard cap on requests sent")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="open loop: total requests/s on a fixed schedule (0 = closed loop)",
    )
    parser.add_argument(
        "--acked-event-ids",
        action="store_true",
        help="add the event ids of the requests answered 2xx to the result (mode event)",
    )
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("this load generator only targets the local machine")
    try:
        import uvloop  # a faster event loop leaves more CPU to the server under test
    except ImportError:  # pragma: no cover - uvloop is a platform dependency, but be tolerant
        runner: Callable[..., Any] = asyncio.run
    else:
        runner = uvloop.run
    result = runner(
        run(
            args.host,
            args.port,
            args.mode,
            args.concurrency,
            args.seconds,
            args.entities,
            args.run_id,
            args.seed,
            args.max_requests,
            args.rate,
            args.acked_event_ids,
        )
    )
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
