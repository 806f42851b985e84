"""``decision-platform``: train, serve, run, and manage models from the command line."""

from __future__ import annotations

import enum
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from decision_platform.cli.common import (
    SEED_MAX,
    Commands,
    config_file,
    console,
    finite,
    open_registry,
    positive,
)
from decision_platform.cli.db import db_app
from decision_platform.cli.explain import explain as explain_command
from decision_platform.cli.models import models_app
from decision_platform.cli.replay import summary_tables
from decision_platform.cli.report import report as report_command
from decision_platform.cli.retrain import retrain as retrain_command
from decision_platform.cli.rules import rules_app
from decision_platform.cli.spool import spool_app
from decision_platform.config import ConfigError, Settings, get_settings
from decision_platform.training import PPO_TIMESTEPS

if TYPE_CHECKING:
    from decision_platform.data import LabelledEvents

app = typer.Typer(
    cls=Commands, help="Real-time AI decision platform.", no_args_is_help=True, add_completion=False
)
app.add_typer(models_app, name="models")
app.add_typer(spool_app, name="spool")
app.add_typer(rules_app, name="rules")
app.add_typer(db_app, name="db")


@app.callback()
def _settings_first() -> None:
    """Real-time AI decision platform."""
    # Every command reads the settings; a bad DP_ variable is one line and exit 2 here, not a pydantic
    # traceback from whichever command met it first.
    try:
        get_settings()
    except ConfigError as exc:
        console.print(f"[red]bad setting:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None


class Source(enum.StrEnum):
    synthetic = "synthetic"
    csv = "csv"
    ulb = "ulb"


def _train(
    settings: Settings,
    source: Source,
    path: Path | None,
    mapping: Path | None,
    entities: int,
    days: float,
    timesteps: int,
    seed: int,
    promote: bool,
) -> None:
    from decision_platform.cli.progress import RichProgress
    from decision_platform.cli.train import report_tables
    from decision_platform.core.rewards import RewardTable
    from decision_platform.features import FeatureSpec
    from decision_platform.rules.ruleset import RuleSet
    from decision_platform.training.train import TrainConfig, TrainingDataError, train_all

    features_path = settings.features_path
    _writable_model_dir(settings)
    if source is Source.synthetic:
        with console.status("generating synthetic data"):
            data = _synthetic(entities, days, seed)
    else:
        from decision_platform.data.csv_import import DatasetError, find_ulb_csv, load_csv

        if source is not Source.ulb and (path is None or mapping is None):
            raise typer.BadParameter("--source csv needs --path FILE.csv and --mapping MAPPING.yaml")
        try:
            if source is Source.ulb:
                path = path or find_ulb_csv(settings.model_dir.parent / "datasets")
                mapping = mapping or settings.config_dir / "datasets" / "ulb_creditcard.yaml"
            assert path is not None and mapping is not None
            data = load_csv(path, mapping, progress=True)
        except DatasetError as exc:  # the file, line and column of the problem: one line, no traceback
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
    summary = data.summary()
    console.print(f"data: {summary}")
    # A data set may bring its own feature definitions (e.g. ULB's V1..V28 event fields).
    if source is not Source.synthetic and mapping is not None:
        candidate = Path(mapping).with_name(Path(mapping).stem + ".features.yaml")
        if candidate.exists():
            features_path = candidate
    spec = config_file(features_path, FeatureSpec.load)  # checked before hours of training, not inside it

    def rules_of(path: Path) -> RuleSet:
        # A data set's own features file may not compute what the rules read (a traceback from inside
        # train_all): say which file lacks it.
        try:
            return RuleSet.load(path, spec.names)
        except ValueError as exc:
            if "uses unknown names" in str(exc):
                raise ValueError(f"{exc}: features the data set's {features_path} does not compute") from None
            raise

    config_file(settings.rules_path, rules_of)
    rewards = config_file(settings.rewards_path, RewardTable.load_for_learning)
    try:
        with RichProgress(console) as progress:
            report = train_all(
                data,
                features_path,
                rewards,
                open_registry(settings),
                TrainConfig(ppo_timesteps=timesteps, seed=seed),
                progress=progress,
                promote=promote,
                source=source.value if path is None else f"{source.value}:{path.name}",
            )
    except TrainingDataError as exc:  # too little of it, or one label only: say so, no traceback
        typer.echo(f"error: cannot train on {path or source.value}: {exc}", err=True)
        raise typer.Exit(2) from None
    for table in report_tables(report):
        console.print(table)
    console.print(f"trained in {report.timings['total_s']:.1f} s; artifacts in {settings.model_dir}")


@app.command()
def train(
    source: Source = typer.Option(Source.synthetic, help="synthetic, csv (with --path/--mapping) or ulb"),
    path: Path | None = typer.Option(None, help="CSV file (for --source csv; optional for ulb)"),
    mapping: Path | None = typer.Option(None, help="column mapping YAML (see config/datasets/)"),
    entities: int = typer.Option(3000, min=1, help="synthetic: number of entities"),
    days: float = typer.Option(14.0, callback=positive, help="synthetic: days of history"),
    timesteps: int = typer.Option(PPO_TIMESTEPS, min=0, help="PPO training steps"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX),
    promote: bool = typer.Option(True, help="make the new models the champions"),
) -> None:
    """Train anomaly, risk and policy models; register (and by default promote) them."""
    _train(get_settings(), source, path, mapping, entities, days, timesteps, seed, promote)


def _curl_examples(settings: Settings) -> str:
    base = f"http://{settings.host}:{settings.port}"
    event = json.dumps(
        {
            "entity_id": "201",
            "event": {
                "event_id": "e-1",
                "amount": 42.5,
                "event_type": "payment",
                "attributes": {"device_id": "d-1", "country": "FR"},
            },
        }
    )
    json_header = "-H 'content-type: application/json'"
    return (
        f"\n[bold]The API is at {base}[/bold]  (docs: {base}/docs)\n"
        f"  curl -s {base}/health\n"
        f'  curl -s -X POST {base}/decide {json_header} -d \'{{"entity_id": "201"}}\'\n'
        f"  curl -s -X POST {base}/decide {json_header} -d '{event}'\n"
        f"  curl -s -X POST {base}/outcome {json_header} "
        '-d \'{"decision_id": DECISION_ID, "outcome": "success"}\'\n'
        f"  curl -s {base}/decisions/DECISION_ID\n"
    )


@app.command()
def serve(
    host: str | None = typer.Option(None, help="default: DP_HOST"),
    port: int | None = typer.Option(None, min=1, max=65535, help="default: DP_PORT"),
    workers: int = typer.Option(1, min=1, help="worker processes (needs a shared feature store: redis://)"),
    server: str = typer.Option(
        "uvicorn",
        envvar="DP_HTTP_SERVER",
        help="uvicorn (httptools + uvloop), or granian if installed (pip install granian); bench/API.md",
    ),
) -> None:
    """Serve the HTTP API with the configured backends."""
    import os

    settings = get_settings()
    if host:
        settings.host = os.environ["DP_HOST"] = host
    if port:
        settings.port = port
        os.environ["DP_PORT"] = str(port)
    if workers > 1 and settings.feature_store_url.startswith("memory://"):
        raise typer.BadParameter(
            "--workers > 1 needs DP_FEATURE_STORE_URL=redis://... (memory:// is per-process)"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    _check_config_files(settings)
    console.print(_curl_examples(settings), soft_wrap=True)
    from decision_platform.api.server import APP_FACTORY, ensure_port_free
    from decision_platform.api.server import serve as serve_api
    from decision_platform.observability.multiprocess import prepare_multiprocess_dir

    try:
        ensure_port_free(settings.host, settings.port)
    except OSError as exc:  # say so in one line, before any worker starts and fails the same way
        raise typer.BadParameter(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}"
        ) from None
    # Several processes: each writes its metrics to files that /metrics merges (prometheus multiprocess mode).
    prepare_multiprocess_dir(workers, settings.model_dir.parent / "prometheus-multiproc")
    if server == "granian":
        try:
            from granian.constants import Interfaces, Loops
            from granian.server import Server
        except ImportError:
            raise typer.BadParameter(
                "--server granian: granian is not installed (pip install granian)"
            ) from None
        Server(
            APP_FACTORY,
            address=settings.host,
            port=settings.port,
            interface=Interfaces.ASGI,
            workers=workers,
            loop=Loops.uvloop,
            factory=True,
            log_enabled=False,
        ).serve()
        return
    if server != "uvicorn":
        raise typer.BadParameter(f"--server: uvicorn or granian, not {server!r}")
    raise typer.Exit(serve_api(settings.host, settings.port, workers))


def _check_config_files(settings: Settings) -> None:
    """features.yaml, rules.yaml and rewards.yaml, checked before a server or worker starts: a broken one
    is one line naming the file and exit 2 (it was a traceback from the application's startup)."""
    from decision_platform.serving.platform import read_config_files

    config_file(settings.config_dir, lambda _: read_config_files(settings))


#: What ``run`` explains with when DP_LLM_URL is unset: the default local model, fetched and started in
#: the background (template narratives meanwhile). ``DP_LLM_URL=none`` turns the LLM off.
RUN_LLM_URL = "embedded://"


def default_llm_url() -> str:
    """DP_LLM_URL for ``run``: as set, else the embedded default (the LLM narrator on by default)."""
    import os

    return os.environ.setdefault("DP_LLM_URL", RUN_LLM_URL)


@app.command()
def run() -> None:
    """The main job on the configured (by default embedded) backends: train if no models, then serve.
    Narratives come from a local LLM unless DP_LLM_URL=none (see default_llm_url)."""
    import os

    default_llm_url()
    settings = get_settings()
    why = _why_train_first(settings)
    if why is not None:
        console.print(f"[bold]{why}: training on the built-in synthetic data set.[/bold]")
        _train(settings, Source.synthetic, None, None, 3000, 14.0, PPO_TIMESTEPS, 0, True)
    # Every parameter explicitly: called as a function, typer's defaults would be OptionInfo objects.
    serve(None, None, 1, os.environ.get("DP_HTTP_SERVER", "uvicorn"))


def _why_train_first(settings: Settings) -> str | None:
    """Why ``run`` trains before serving; None when the registered champions load and can serve.

    Champions that exist but cannot be loaded (an artifact of an older format, a missing or altered file)
    would make every decision a fallback: ``run`` is the laptop command, so it trains a servable set
    instead. A registry that cannot be reached is not a reason (training would fail the same way; the
    server decides by fallback until it answers)."""
    from decision_platform.models.bundle import load_champions

    registry = open_registry(settings)
    if not registry.has_champions():
        return "No models yet"
    loaded = load_champions(registry, shadow=False)
    if loaded.complete or any(e.startswith("registry unavailable") for e in loaded.errors.values()):
        return None
    problems = "; ".join(f"{kind}: {error}" for kind, error in sorted(loaded.errors.items()))
    return f"The registered champions cannot be served ({problems})"


def _writable_model_dir(settings: Settings) -> None:
    """DP_MODEL_DIR must take the artifacts: checked before the data is read and the models trained (it
    was a NotADirectoryError / PermissionError traceback once all that was done)."""
    from decision_platform.models.registry import UnwritableDirectoryError, check_writable

    try:
        check_writable(settings.model_dir)
    except UnwritableDirectoryError as exc:
        typer.echo(f"error: DP_MODEL_DIR: {exc}", err=True)
        raise typer.Exit(2) from None


def _synthetic(entities: int, days: float, seed: int) -> LabelledEvents:
    """The built-in synthetic data set; one too large to make (``--days 1e300``: a numpy ValueError, a
    MemoryError or hours of work) is the options' error, exit 2."""
    from decision_platform.data import generate

    try:
        return generate(n_entities=entities, days=days, seed=seed)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--entities' / '--days'") from None


def _http_url(value: str) -> str:
    """--url's callback: an http(s) URL with a host (``http://[::1`` was an InvalidURL traceback; another
    scheme failed every event one by one)."""
    import httpx

    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise typer.BadParameter(f"{ascii(value)[:80]}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise typer.BadParameter(f"{ascii(value)[:80]}: expected an http:// or https:// URL with a host")
    return value


class Target(enum.StrEnum):
    kafka = "kafka"
    http = "http"


def _load_events(
    settings: Settings, source: str, mapping: Path | None, entities: int, days: float, seed: int
) -> LabelledEvents:
    if source == "synthetic":
        return _synthetic(entities, days, seed)
    from decision_platform.data.csv_import import DatasetError, load_csv

    if mapping is None:
        raise typer.BadParameter("a CSV source needs --mapping MAPPING.yaml")
    try:
        return load_csv(Path(source), mapping, progress=True)
    except DatasetError as exc:  # as train says it: file, line and column in one line, no traceback
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def worker(
    metrics_port: int | None = typer.Option(
        None, min=1, max=65535, help="serve Prometheus metrics on this port"
    ),
) -> None:
    """Consume the events topic: windows, decisions (stored + published), dead letters; Ctrl-C/SIGTERM
    finishes the batch, commits and leaves the group."""
    import signal
    import threading

    from decision_platform.events.kafka import KafkaSink, KafkaSource
    from decision_platform.serving.platform import WORKER_GC_THRESHOLD, Platform, settle_heap
    from decision_platform.serving.worker import StreamWorker

    settings = get_settings()
    if not settings.kafka_bootstrap_servers:
        console.print(
            "[red]DP_KAFKA_BOOTSTRAP_SERVERS is not set.[/red] Without a broker, POST /events on the API "
            "runs the same worker logic in-process: no worker process is needed."
        )
        raise typer.Exit(2)
    _check_config_files(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    settings = settings.model_copy(
        update={
            "feature_store_timeout_s": settings.worker_feature_store_timeout_s,
            "db_batch_size": max(settings.db_batch_size, settings.worker_batch_size),
            # The worker writes no narrative (the API's narrator does): no LLM to fetch or start here.
            "llm_url": None,
        }
    )
    if metrics_port:
        from decision_platform.observability import metrics

        metrics.start_worker_metrics_server(metrics_port, settings.host)
    platform = Platform.start(settings)
    platform.start_model_refresh()  # promotions reach the worker too, within DP_MODEL_REFRESH_S
    settle_heap(WORKER_GC_THRESHOLD)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stream = StreamWorker(settings, platform.engine, platform.store, KafkaSink(settings))
    console.print(f"worker consuming {settings.kafka_events_topic} as group {settings.kafka_group_id}")
    try:
        processed = stream.run(KafkaSource(settings), stop)
    finally:
        platform.close()
    console.print(f"worker stopped after {processed} messages")


@app.command()
def replay(
    source: str = typer.Option("synthetic", help="synthetic, or a CSV file (with --mapping)"),
    mapping: Path | None = typer.Option(None, help="column mapping of the CSV"),
    to: Target = typer.Option(Target.kafka, help="kafka (the events topic) or http (POST /decide)"),
    rate: float = typer.Option(
        1000.0, min=0.0, callback=finite, help="events per second (0: as fast as possible)"
    ),
    limit: int | None = typer.Option(None, min=1, help="replay at most this many events"),
    url: str = typer.Option("http://127.0.0.1:8000", help="the API, for --to http", callback=_http_url),
    concurrency: int = typer.Option(4, min=1, help="concurrent senders"),
    entities: int = typer.Option(500, min=1, help="synthetic: number of entities"),
    days: float = typer.Option(2.0, callback=positive, help="synthetic: days of history"),
    seed: int = typer.Option(7, min=0, max=SEED_MAX),
    shift_to_now: bool = typer.Option(True, help="move the data set in time so that it ends now"),
    outcomes: bool = typer.Option(
        False, help="--to http: also POST each decision's ground-truth outcome to /outcome, later"
    ),
    outcome_delay: float = typer.Option(
        2.0, min=0.0, callback=finite, help="--outcomes: seconds between a decision and its outcome"
    ),
) -> None:
    """Stream a data set as live traffic, with progress and a final summary.

    With --to http --outcomes, the whole learning loop runs from here: each event's true label and the
    action decided turn into an outcome (fraud, chargeback, success, abandoned, false_positive, by the
    rule of the training simulator and the `simulation` settings of rewards.yaml, seeded by --seed),
    posted to /outcome --outcome-delay seconds after the decision. The replay ends once every outcome
    is posted. Kafka replays cannot do this: the decisions (and their ids) are made by the worker.
    """
    from decision_platform.cli.progress import RichProgress
    from decision_platform.learning import replay as replaying

    if outcomes and to is not Target.http:
        raise typer.BadParameter(
            "--outcomes needs --to http: outcomes are posted for the decision ids /decide answers "
            "(a Kafka replay never sees them)",
            param_hint="'--outcomes'",
        )
    settings = get_settings()
    data = _load_events(settings, source, mapping, entities, days, seed)
    events = data.events[:limit]
    if shift_to_now:
        events = replaying.shift_to_now(events)
    reporter = None
    if to is Target.kafka:
        if not settings.kafka_bootstrap_servers:
            raise typer.BadParameter("--to kafka needs DP_KAFKA_BOOTSTRAP_SERVERS")
        send, chunk = replaying.kafka_sender(settings), 100
    else:
        if outcomes:
            from decision_platform.core.rewards import RewardTable

            labels = {e.event_id: int(label) for e, label in zip(data.events, data.labels, strict=True)}
            reporter = replaying.OutcomeReporter(
                url,
                labels,
                RewardTable.load(settings.rewards_path).simulation,
                delay_s=outcome_delay,
                seed=seed,
                workers=concurrency,
            )
        send, chunk = replaying.http_sender(url, outcomes=reporter), 1
    try:
        with RichProgress(console, notes=True) as progress:
            summary = replaying.replay(
                events, send, rate, chunk, progress, workers=concurrency, outcomes=reporter
            )
    finally:
        if reporter is not None:  # replay() drained it; after Ctrl-C, do not wait out the delays
            reporter.close(drain=False)
    for table in summary_tables(summary, to.value, outcome_delay if reporter is not None else None):
        console.print(table)
    if summary.outcomes_conflicts:
        console.print(
            "[yellow]conflicts:[/yellow] those decisions already had a different outcome (outcomes "
            "are final); a replay with another --seed can draw another outcome for a throttle"
        )
    errors = [("first error", summary.first_error), ("first outcome error", summary.first_outcome_error)]
    for label, error in errors:
        if error:
            console.print(f"[red]{label}:[/red] {error}")
    if any(error for _, error in errors):
        raise typer.Exit(1)


app.command("report")(report_command)
app.command("explain")(explain_command)
app.command("retrain")(retrain_command)
