"""The online feature store: per-entity windows in Redis, updated and read by one Lua script.

One EVALSHA per event does dedupe, late check, store, trims, TTL and the aggregates atomically, so
concurrent workers never see half an update and a redelivered event is never counted twice. A batch of
events goes out as one non-transactional pipeline: one round trip for the whole batch.

``memory://`` runs the very same script on fakeredis (Lua via lupa), so laptops and unit tests exercise
the production code path. ``redis+cluster://`` spreads entities over a Redis Cluster: an entity's keys
share one hash slot (``{entity_id}`` tag), so each script call touches one slot of one node, and a batch
pipeline is split per node by redis-py's cluster client.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import hiredis
import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from decision_platform.core.events import Event
from decision_platform.features.spec import MISSING, FeatureSpec

DEFAULT_KEY_PREFIX = "dp:f:"
SCRIPT_BODY = (
    resources.files("decision_platform.features").joinpath("windows.lua").read_text(encoding="utf-8")
)
_FLAG_DUPLICATE, _FLAG_LATE = 1, 2
#: Take one stored event out of its entity's windows (``FeatureStore.withdraw``): the member and its dedupe
#: entry go, and "#max" becomes the newest time still stored (windows.lua never trims the newest).
WITHDRAW_SCRIPT = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[2])
local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if newest[2] then redis.call('HSET', KEYS[2], '#max', newest[2]) else redis.call('HDEL', KEYS[2], '#max') end
return 1
"""
#: What a Redis or Redis Cluster client raises when it cannot answer (the cluster client's own errors,
#: e.g. no reachable startup node or an uncovered slot, do not derive from RedisError).
_CLIENT_ERRORS = (redis.RedisError, RedisClusterException)
#: The wrapper some servers put around an error raised inside a script (Redis 6, fakeredis).
_SCRIPT_ERROR_WRAPPER = re.compile(r"^(?:ERR )?Error running script \(call to [^)]*\): @user_script:[^:]*: ")


def damaged_entity(error: Exception) -> bool:
    """Whether a script call's error reply comes from the entity's own keys rather than from the store.

    Keys of another type (WRONGTYPE: something else wrote under the prefix) and the script's Lua failing on
    what it read (a runtime error, e.g. a member that is not "id,time,amount,...") concern that entity only:
    its event is decided with a fallback and the others go on. Every other error reply carries a condition
    of the server (OOM, READONLY, BUSY, LOADING, ...): the whole call fails, to be retried or fallen back.
    A damaged entity is never retried: the same keys would fail the same way, and a stream batch holding
    its event would be retried forever."""
    message = _SCRIPT_ERROR_WRAPPER.sub("", str(error), count=1).removeprefix("ERR ")
    # A Lua runtime error starts with where it happened: "user_script:64: ..." (Redis 7) or
    # '[string "..."]:64: ...' (Lua's own chunk names).
    return message.startswith(("WRONGTYPE", "user_script:", "[string "))


class FeatureStoreError(RuntimeError):
    """The feature store could not answer; callers fall back (DESIGN §7) rather than fail the request."""


@dataclass(frozen=True, slots=True)
class FeatureResult:
    """One feature vector (spec order) and what happened to the event that produced it."""

    #: float64, in FeatureSpec.names order; read-only (rows of one batch share memory).
    values: np.ndarray
    #: The event_id was already stored: nothing was written, the event is counted once.
    duplicate: bool = False
    #: The event was too late (or older than everything a full entity keeps): features, but not stored.
    late: bool = False
    #: FeatureSpec.names, for as_dict.
    names: tuple[str, ...] = ()
    #: The entity's stored windows could not be read (keys of another type, members the script cannot
    #: parse): ``values`` are NaN and the event is decided with a fallback. Only this entity is affected.
    error: str | None = None

    def as_dict(self) -> dict[str, float]:
        """Feature name -> value, in vector order (for reasons, rules and the decision record)."""
        if len(self.names) != len(self.values):
            raise ValueError("FeatureResult needs the spec's names to build a dict")
        return dict(zip(self.names, self.values.tolist(), strict=True))


class FeatureStore(ABC):
    """Per-entity rolling-window features. Implementations must match offline.py exactly."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self._names = tuple(spec.names)

    @abstractmethod
    def update(self, events: Sequence[Event]) -> list[FeatureResult]:
        """Apply events in order; each result is the features at its own event time."""

    @abstractmethod
    def read(self, entity_id: str, at: float) -> FeatureResult:
        """Features at time ``at`` without writing (a decision without an event)."""

    def read_many(self, entity_ids: Sequence[str], at: float) -> list[FeatureResult]:
        """Features of several entities at ``at`` (a micro-batch of decisions without events): one round
        trip where the backend can pipeline, else one read each."""
        return [self.read(entity_id, at) for entity_id in entity_ids]

    @abstractmethod
    def withdraw(self, event: Event) -> bool:
        """Take an applied event out of its entity's windows; False if they do not hold it. For an event
        that should not have counted: one whose id another entity's event holds (the decision log refuses
        it only after the windows took it)."""

    @abstractmethod
    def ping(self) -> bool:
        """True when the backend answers (for /ready)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""


class RedisFeatureStore(FeatureStore):
    """FeatureStore on any redis-py client: a real Redis, or fakeredis for ``memory://``."""

    def __init__(
        self,
        client: redis.Redis | RedisCluster | None,
        spec: FeatureSpec,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        description: str = "redis",
        packed: bool = False,
    ) -> None:
        super().__init__(spec)
        if "{" in key_prefix or "}" in key_prefix:
            # The first {...} of a key is its cluster hash tag: it must be the entity's.
            raise ValueError(f"feature store key prefix {key_prefix!r} may not contain braces")
        self._client = client
        self.key_prefix = key_prefix
        self._description = description
        self.script = script_source(spec)
        self._sha = hashlib.sha1(self.script.encode()).hexdigest().encode()
        self._prefix = key_prefix.encode()
        self._windowed = bool(spec.attribute_windows)
        #: Send a batch's calls packed in one write on a pooled connection (one Redis server's client).
        self._packed = packed

    @property
    def client(self) -> redis.Redis | RedisCluster:
        """The redis-py client (one Redis, fakeredis, or a cluster)."""
        assert self._client is not None
        return self._client

    def keys(self, entity_id: str) -> list[bytes]:
        """The entity's keys; the {hash tag} keeps them in one cluster slot, as a script requires (entity
        ids hold no braces, core.events.Identifier, so the tag is the whole id)."""
        base = b"%s{%s}" % (self._prefix, entity_id.encode())
        return [base + b":z", base + b":h"]

    def update(self, events: Sequence[Event]) -> list[FeatureResult]:
        if not events:
            return []
        replies = self._run([(event.entity_id, self._update_args(event)) for event in events])
        return self._results(replies, [e.timestamp for e in events], events)

    def read(self, entity_id: str, at: float) -> FeatureResult:
        replies = self._run([(entity_id, [_num(at).encode()])])
        return self._results(replies, [at], None)[0]

    def read_many(self, entity_ids: Sequence[str], at: float) -> list[FeatureResult]:
        if not entity_ids:
            return []
        now = _num(at).encode()
        replies = self._run([(entity_id, [now]) for entity_id in entity_ids])
        return self._results(replies, [at] * len(entity_ids), None)

    def withdraw(self, event: Event) -> bool:
        try:
            taken = self.client.eval(
                WITHDRAW_SCRIPT, 2, *self.keys(event.entity_id), *self._update_args(event), event.event_id
            )
        except _CLIENT_ERRORS as exc:
            raise FeatureStoreError(f"feature store ({self._description}) failed: {exc}") from exc
        return bool(taken)

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except _CLIENT_ERRORS:
            return False

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # --- internals

    def _update_args(self, event: Event) -> list[bytes]:
        """The event as its sorted-set member: "event_id,ts,amount,token,...,value,..." (see windows.lua)."""
        ts, amount = _num(event.timestamp), _num(float(event.amount or 0.0))
        parts = [event.event_id, ts, amount, *self.spec.distinct_tokens(event)]
        if self._windowed:
            parts += [MISSING if v is None else _num(v) for v in self.spec.window_values(event)]
        return [",".join(parts).encode()]

    def _run(self, calls: list[tuple[str, list[bytes]]]) -> list[bytes | Exception]:
        """EVALSHA every call in one round trip (:meth:`_send`); load the script once if the server lacks
        it (new server, restart, failover). A damaged entity's error is returned in its call's place."""
        if not calls:
            return []
        try:
            replies = self._send(calls)
            missing = [i for i, r in enumerate(replies) if isinstance(r, redis.exceptions.NoScriptError)]
            if missing:
                # A NOSCRIPT call did not run, so running it again cannot double count.
                self.client.script_load(self.script)
                for i, reply in zip(missing, self._send([calls[i] for i in missing]), strict=True):
                    replies[i] = reply
        except _CLIENT_ERRORS as exc:
            raise FeatureStoreError(f"feature store ({self._description}) failed: {exc}") from exc
        for reply in replies:
            if isinstance(reply, Exception) and not damaged_entity(reply):
                raise FeatureStoreError(f"feature store ({self._description}) script error: {reply}")
        return replies  # a damaged entity's error stays in its place: _results gives it a failed result

    def _send(self, calls: list[tuple[str, list[bytes]]]) -> list[Any]:
        """Replies in call order; a script error is returned in its place, as a pipeline does. One Redis
        server: packed by hiredis in one write; a cluster or fakeredis: redis-py's pipeline (a plain call
        for one command)."""
        commands = [("EVALSHA", self._sha, b"2", *self.keys(entity_id), *args) for entity_id, args in calls]
        if self._packed:
            return self._send_packed(commands)
        if len(commands) == 1:
            try:
                return [self.client.execute_command(*commands[0])]
            except redis.exceptions.ResponseError as exc:
                return [exc]
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return pipe.execute(raise_on_error=False)

    def _send_packed(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """A pipeline's traffic without its Python work per command: the commands packed by hiredis into
        one write on a pooled connection, the replies read back in order (a third less client CPU an event
        than ``pipeline()``; bench/README.md). Errors as a pipeline gives them: a script error in its
        reply's place; a connection error or a timeout raises, and the connection, which may still owe
        replies, is dropped."""
        pool = self.client.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command([b"".join([hiredis.pack_command(c) for c in commands])])
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(connection.read_response())
                except redis.exceptions.ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            connection.disconnect()
            raise
        finally:
            pool.release(connection)

    def _table(self, replies: list[bytes]) -> np.ndarray:
        """The script's replies as one matrix: a flag and the raw window values a row. Anything else (a
        server that is not Redis answering ``+OK``, a script of another version) is the store failing."""
        try:
            fields = b",".join(replies).split(b",")
            if len(fields) != len(replies) * (self.spec.raw_width + 1):
                raise ValueError(f"{len(fields)} values for {len(replies)} entities")
            return np.array(fields, dtype=np.float64).reshape(len(replies), -1)
        except (TypeError, ValueError) as exc:
            raise FeatureStoreError(
                f"feature store ({self._description}) answered what the window script never returns ({exc})"
            ) from exc

    def _results(
        self, replies: list[bytes | Exception], timestamps: list[float], events: Sequence[Event] | None
    ) -> list[FeatureResult]:
        errors = [(str(r) or type(r).__name__)[:200] if isinstance(r, Exception) else None for r in replies]
        if any(e is not None for e in errors):  # zeros stand in for a damaged entity's reply; then NaN
            blank = b",".join([b"0"] * (self.spec.raw_width + 1))
            replies = [blank if isinstance(reply, Exception) else reply for reply in replies]
        table = self._table(replies)
        features = self.spec.assemble(table[:, 1:], self.spec.event_values(timestamps, events))
        for i, error in enumerate(errors):
            if error is not None:
                features[i] = np.nan
        features.setflags(write=False)  # results share this matrix: no one may edit another's row
        return [
            FeatureResult(
                values=row,
                names=self._names,
                duplicate=flag == _FLAG_DUPLICATE,
                late=flag == _FLAG_LATE,
                error=error,
            )
            for row, flag, error in zip(features, table[:, 0].tolist(), errors, strict=True)
        ]


class RedisClusterFeatureStore(RedisFeatureStore):
    """The same store on a Redis Cluster (``redis+cluster://host:port[,host:port...]``).

    Every script call names the entity's two keys, which share the ``{entity_id}`` hash tag, so Redis
    runs it on the one node that owns the slot: windows stay exact and atomic per entity, whatever the
    number of nodes. The client is made on first use, because redis-py's cluster client reads the slot
    map in its constructor: like ``redis://``, an unreachable cluster fails the first call (and /ready),
    not the platform's start.
    """

    def __init__(
        self,
        address: ClusterAddress,
        spec: FeatureSpec,
        timeout_s: float,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        description: str = "redis+cluster",
    ) -> None:
        super().__init__(None, spec, key_prefix=key_prefix, description=description)
        self.address = address
        self._timeout_s = timeout_s
        self._lock = threading.Lock()

    @property
    def client(self) -> RedisCluster:
        with self._lock:
            if self._client is None:
                self._client = RedisCluster(
                    startup_nodes=self.address.nodes,
                    username=self.address.username,
                    password=self.address.password,
                    socket_timeout=self._timeout_s,
                    socket_connect_timeout=self._timeout_s,
                    # One retry, at once: after a failover the client re-reads the slot map and the call
                    # goes to the new owner; more retries with backoff would blow the latency budget.
                    retry=Retry(NoBackoff(), 1),
                    protocol=2,  # as for one server (open_feature_store)
                )
            assert isinstance(self._client, RedisCluster)
            return self._client

    def ping(self) -> bool:
        """True when every master answers: a lost master takes its slots' entities with it."""
        try:
            return bool(self.client.ping(target_nodes=RedisCluster.PRIMARIES))
        except _CLIENT_ERRORS:
            return False


@dataclass(frozen=True, slots=True)
class ClusterAddress:
    """What a ``redis+cluster://`` URL says: the startup nodes and the credentials (ACL user optional)."""

    nodes: list[ClusterNode]
    username: str | None = None
    password: str | None = None


def parse_cluster_url(url: str) -> ClusterAddress:
    """``redis+cluster://[[user]:password@]host:port[,host:port...]`` -> startup nodes and credentials."""
    parts = urlsplit(url)
    netloc = parts.netloc
    username = password = None
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        name, _, secret = userinfo.partition(":")
        username, password = name or None, secret or None
    nodes = []
    for address in filter(None, netloc.split(",")):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"bad Redis Cluster node {address!r} in {_redact(url)!r}: use host:port")
        nodes.append(ClusterNode(host, int(port)))
    if not nodes:
        raise ValueError(f"{_redact(url)!r} names no node: use redis+cluster://host:port[,host:port...]")
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"{_redact(url)!r}: a Redis Cluster has only database 0")
    return ClusterAddress(nodes, username, password)


def script_source(spec: FeatureSpec) -> str:
    """windows.lua with the spec's constants prepended: fewer arguments to send and parse per event."""
    seconds = spec.window_seconds
    order = sorted(range(len(seconds)), key=lambda i: seconds[i])
    ascending = ", ".join(_num(seconds[i]) for i in order)
    slots = ", ".join(str(i + 1) for i in order)
    attr_std = ", ".join(_lua_bool("std" in item.aggregations) for item in spec.attribute_windows)
    header = (
        f"local LATE_TOLERANCE = {_num(spec.late_tolerance)}\n"
        f"local MAX_EVENTS = {spec.retention.max_events_per_entity}\n"
        f"local TTL_MS = {math.ceil(spec.ttl_seconds * 1000)}\n"
        f"local N_DISTINCT = {len(spec.distinct)}\n"
        f"local ASCENDING = {{{ascending}}}\n"
        f"local SLOT = {{{slots}}}\n"
        f"local AMOUNT_STD = {_lua_bool(spec.amount_std)}\n"
        f"local N_ATTR = {len(spec.attribute_windows)}\n"
        f"local ATTR_STD = {{{attr_std}}}\n"
    )
    return header + SCRIPT_BODY


def _lua_bool(flag: bool) -> str:
    return "true" if flag else "false"


def _num(x: float) -> str:
    """Shortest exact text of a float: Redis and Lua parse it back to the same double."""
    return repr(float(x))


#: memory:// servers by name: the API and the worker in one process must see the same windows.
_memory_servers: dict[str, Any] = {}
_memory_lock = threading.Lock()


def open_feature_store(
    url: str, spec: FeatureSpec, timeout_s: float, *, key_prefix: str = DEFAULT_KEY_PREFIX
) -> FeatureStore:
    """The store for a URL: ``memory://[name]`` (fakeredis, one server per name per process),
    ``redis://host:port/db`` or ``redis+cluster://host:port[,host:port...]``. Nothing connects here: an
    unreachable Redis fails the first call, within ``timeout_s`` per node tried, with FeatureStoreError."""
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        import fakeredis  # only needed for the embedded backend

        name = urlsplit(url).netloc
        with _memory_lock:
            if name not in _memory_servers:
                _memory_servers[name] = fakeredis.FakeServer()
            server = _memory_servers[name]
        return RedisFeatureStore(
            fakeredis.FakeRedis(server=server), spec, key_prefix=key_prefix, description=url
        )
    if scheme in ("redis", "rediss", "unix"):
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # Fail fast: the caller falls back; retries with backoff would blow the latency budget.
            retry=Retry(NoBackoff(), 0),
            # RESP2: every Redis-compatible server speaks it, the script's replies are strings either way,
            # and there is no HELLO handshake, whose reply redis-py reads unchecked (AttributeError).
            protocol=2,
        )
        return RedisFeatureStore(client, spec, key_prefix=key_prefix, description=_redact(url), packed=True)
    if scheme == "redis+cluster":
        return RedisClusterFeatureStore(
            parse_cluster_url(url), spec, timeout_s, key_prefix=key_prefix, description=_redact(url)
        )
    raise ValueError(
        f"unsupported feature store URL {_redact(url)!r}: use memory://, redis://host:port/db or "
        "redis+cluster://host:port[,host:port...]"
    )


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    userinfo, hosts = parts.netloc.rsplit("@", 1)
    if ":" not in userinfo:
        return url
    netloc = userinfo.split(":", 1)[0] + ":***@" + hosts
    return parts._replace(netloc=netloc).geturl()
