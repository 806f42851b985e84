"""Routes: thin. Parse, call the platform, shape the answer; the logic lives in the services."""

from __future__ import annotations

import time
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, HTTPException, Path, Query, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from decision_platform.api.deps import PlatformDep
from decision_platform.api.schemas import (
    RETRY_AFTER_HEADER,
    DecideRequest,
    DecisionResponse,
    EventBatch,
    EventsAccepted,
    EventsBody,
    ExplanationResponse,
    OutcomeRequest,
    OutcomeResponse,
    StoredDecision,
    error_responses,
)
from decision_platform.core.events import INT64_MAX, Event, ahead_of_clock
from decision_platform.core.records import DUPLICATE, FIRST_DAMAGED, REFUSED, DecisionRecord, refusal_message
from decision_platform.events.kafka import BrokerUnavailableError
from decision_platform.observability import metrics
from decision_platform.serving.engine import RETRY_READER, Decision, DecisionRequest
from decision_platform.serving.outcomes import (
    OutcomeConflictError,
    UnknownDecisionError,
    UnknownOutcomeError,
    record_outcome,
)
from decision_platform.serving.platform import Platform
from decision_platform.storage.decisions import counted, intact
from decision_platform.storage.errors import DamagedDecisionError, DatabaseUnavailable

router = APIRouter()

#: Ids are BIGINT in the database: a larger one names no decision (422, not a 500 from the driver).
DecisionIdPath = Annotated[int, Path(gt=0, le=INT64_MAX)]


@router.get("/health", summary="The process is alive", responses=error_responses())
async def health() -> dict[str, str]:
    # async: answered on the event loop, so it never waits for a threadpool busy with decisions, and it
    # touches no dependency -- a liveness probe must not restart a process that is spooling decisions.
    return {"status": "ok"}


@router.get(
    "/ready",
    summary="State of each dependency",
    responses={
        **error_responses(),
        503: {"description": "Degraded: the same body, naming what fails", "headers": RETRY_AFTER_HEADER},
    },
)
def ready(platform: PlatformDep, response: Response) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    try:
        platform.writer.query(platform.repository.ping)  # bounded: a stalled database is "unavailable"
        checks["database"] = "ok"
    except DatabaseUnavailable as exc:
        checks["database"] = f"unavailable: {exc.reason}"
    status = platform.writer.status()
    checks["spool"] = {"pending": status.pending, "quarantined": status.quarantined}
    checks["feature_store"] = "ok" if platform.store.ping() else "unreachable"
    checks["models"] = {
        kind: platform.models.versions.get(kind) or f"missing: {platform.models.errors.get(kind)}"
        for kind in ("anomaly", "risk", "policy")
    }
    # Which narrator writes narratives now (llm / starting / template): informative, never a reason for 503.
    narrator = platform.narrator
    checks["narrator"] = narrator.status() if narrator is not None else {"active": "template"}
    healthy = checks["database"] == "ok" and checks["feature_store"] == "ok" and platform.models.complete
    # Not ready still serves decisions (fallbacks, spool); 503 tells a load balancer to prefer a healthy peer.
    response.status_code = 200 if healthy else 503
    return {"status": "ready" if healthy else "degraded", "checks": checks}


@router.post(
    "/decide",
    response_model=DecisionResponse,
    summary="Decide: allow, throttle or block",
    responses=error_responses(400, 409, 413, 422, 503),
)
async def decide(body: DecideRequest, platform: PlatformDep) -> Response:
    # api/decide_lane.py answers well-formed requests before FastAPI sees them; this route documents the
    # contract and answers the rest (bodies that do not validate, other content types) with its errors.
    return Response(await decided(platform, body), media_type="application/json")


async def decided(platform: Platform, body: DecideRequest) -> bytes:
    """The JSON answer to ``POST /decide`` once the decision is durable; HTTPException 503 when it is not."""
    # async: the request waits on the event loop for its micro-batch (serving/batcher.py), with no
    # threadpool hop; the answer is the engine's dict as JSON, not re-validated (tests hold it to the schema).
    batcher = platform.batcher
    assert batcher is not None, "Platform.start builds the decider"
    if body.event is not None:
        _refuse_times_ahead([body.event], platform.settings.max_event_ahead_s, ("body", "event"))
    try:
        decision = await batcher.decide(DecisionRequest(body.entity_id, body.event))
    except TimeoutError:
        raise HTTPException(503, "the decision could not be stored durably in time; retry") from None
    except OSError:
        # Neither the database nor the local spool could take the decision: do not acknowledge it.
        raise HTTPException(503, "the decision could not be stored durably; retry") from None
    if decision.storage in REFUSED:
        # A retry gets the first decision; an id another entity's event holds does not (producers that
        # number events per account reuse ids across them), nor one of the entity's event with other
        # content, nor a retry whose first decision is stored damaged: refused, not counted in the windows.
        raise HTTPException(409, decision.refusal)
    if decision.storage == DUPLICATE:
        _answerable_retry(decision)
    narrator = platform.narrator
    if narrator is not None and decision.storage != DUPLICATE:  # a queue append: never waits for the LLM
        narrator.submit(decision.record)
    return orjson.dumps(decision.response)


#: The answer's fields that are not the stored column of the same name.
_COLUMN_OF_ANSWER = {"rules": "rules_fired"}


def _answerable_retry(decision: Decision) -> None:
    """A retry is answered with its event's first decision as stored, held to the answer's schema first
    (new decisions are not: the engine builds them, and tests hold them to it). The engine refuses a first
    decision damaged in what storage checks; a row can still hold what only the answer's schema refuses (a
    fired rule without its description, a model version that is not text), which would have been answered
    200 against the contract clients parse. Refused as the engine refuses it: 409, not decided again."""
    record = decision.record
    try:
        DecisionResponse.model_validate(decision.response)
    except ValidationError as exc:
        damage = _schema_damage(record, exc, RETRY_READER)
        raise HTTPException(409, refusal_message(FIRST_DAMAGED, record.event_id or "", str(damage))) from None


def _schema_damage(record: DecisionRecord, exc: ValidationError, reader: str) -> DamagedDecisionError:
    """The stored column behind the first field an answer's schema refused, as the record's damage
    (counted under ``reader``)."""
    where = exc.errors()[0]["loc"]
    field = str(where[1] if where[0] == "policy" and len(where) > 1 else where[0])
    column = _COLUMN_OF_ANSWER.get(field, field)
    return counted(DamagedDecisionError(record.id, column, getattr(record, column, None)), reader)


@router.post(
    "/events",
    response_model=EventsAccepted,
    summary="Ingest events (one, or a batch)",
    responses={
        **error_responses(400, 413, 422, 503),
        202: {"model": EventsAccepted, "description": "Kafka mode: acknowledged by the broker"},
    },
)
def ingest_events(body: EventsBody, platform: PlatformDep, response: Response) -> dict[str, Any]:
    events = body.events if isinstance(body, EventBatch) else [body]
    at = ("body", "EventBatch", "events") if isinstance(body, EventBatch) else ("body", "Event")
    _refuse_times_ahead(events, platform.settings.max_event_ahead_s, at)
    if platform.producer is not None:
        try:
            platform.producer.send(events)
        except BrokerUnavailableError as exc:
            raise HTTPException(503, f"the broker did not acknowledge the events; retry ({exc})") from None
        metrics.EVENTS_PRODUCED.inc(len(events))
        response.status_code = 202
        return {"accepted": len(events), "mode": "kafka", "decision_ids": None}
    # No broker: the stream worker's own logic, right here, before answering (nothing is queued).
    summary = platform.inline_worker.process_events(events)  # type: ignore[union-attr]
    return {"accepted": len(events), "mode": "in-process", "decision_ids": summary.decision_ids}


def _refuse_times_ahead(events: list[Event], max_ahead_s: float, at: tuple[str, ...]) -> None:
    """422 naming each event whose time is too far ahead of the clock (core/events.py ahead_of_clock)."""
    now, batch = time.time(), at[-1] == "events"
    errors = [
        {
            "type": "value_error",
            "loc": (*at, *((i,) if batch else ()), "timestamp"),
            "msg": why,
            "input": None,
        }
        for i, event in enumerate(events)
        if (why := ahead_of_clock(event.timestamp, now, max_ahead_s)) is not None
    ]
    if errors:
        raise RequestValidationError(errors)


@router.post(
    "/outcome",
    response_model=OutcomeResponse,
    summary="Report what happened after a decision",
    responses={
        **error_responses(400, 404, 409, 413, 422, 503),
        201: {"model": OutcomeResponse, "description": "Recorded"},
    },
)
def outcome(body: OutcomeRequest, platform: PlatformDep, response: Response) -> dict[str, Any]:
    try:
        recorded = record_outcome(platform.writer, platform.rewards, body.decision_id, body.outcome)
    except UnknownOutcomeError as exc:
        raise HTTPException(422, str(exc)) from None
    except UnknownDecisionError as exc:
        raise HTTPException(404, str(exc)) from None
    except OutcomeConflictError as exc:
        raise HTTPException(409, str(exc)) from None
    response.status_code = 201 if recorded.created else 200
    return {
        "decision_id": recorded.decision_id,
        "outcome": recorded.outcome,
        "reward": recorded.reward,
        "received_at": recorded.received_at.isoformat() if recorded.received_at else "",
        "created": recorded.created,
    }


@router.get(
    "/decisions/{decision_id}",
    response_model=StoredDecision,
    summary="A stored decision record",
    responses=error_responses(404, 409, 422, 503),
)
def get_decision(decision_id: DecisionIdPath, platform: PlatformDep) -> StoredDecision:
    record = platform.writer.find_decision(decision_id)  # spooled decisions are readable too
    if record is None:
        raise HTTPException(404, f"no decision {decision_id}")
    return stored_decision(record)


#: ``dp_damaged_rows_total{reader}`` of ``GET /decisions/{id}``.
RECORD_READER = "decision record"


def stored_decision(record: DecisionRecord) -> StoredDecision:
    """The record as ``GET /decisions/{id}`` answers it. A row damaged in a column (a hand edit, an older
    version) is refused with ``DamagedDecisionError`` naming it: 409 (storage.errors says why), not a 500
    from the answer's own validation, nor an answer holding what the platform never decided (an action of
    3). Storage's check comes first; this schema then also refuses what it checks no deeper (a fired rule
    without its tier, a model version that is not text)."""
    row = intact(record, RECORD_READER).to_row()
    row["created_at"] = record.created_at.isoformat()
    try:
        return StoredDecision.model_validate(row)
    except ValidationError as exc:
        raise _schema_damage(record, exc, RECORD_READER) from None


@router.get(
    "/decisions/{decision_id}/explanation",
    response_model=ExplanationResponse,
    summary="The decision explained in words by a local LLM, from its facts only",
    responses={
        **error_responses(404, 409, 422, 503),
        202: {
            "model": ExplanationResponse,
            "description": "Still being written: the template narrative meanwhile",
        },
    },
)
def get_explanation(
    decision_id: DecisionIdPath,
    platform: PlatformDep,
    response: Response,
    wait: bool = Query(False, description="wait for the narrative (up to DP_LLM_WAIT_TIMEOUT_S)"),
    timeout: float | None = Query(None, gt=0, description="seconds to wait at most, with wait=true"),
) -> dict[str, Any]:
    narrator = platform.narrator
    explanation = narrator.explanation(decision_id, wait, timeout) if narrator is not None else None
    if explanation is None:
        raise HTTPException(404, f"no decision {decision_id}")
    response.status_code = 202 if explanation.status == "pending" else 200
    return explanation.as_dict()


@router.get("/metrics", include_in_schema=False)
def prometheus_metrics() -> Response:
    body, content_type = metrics.render()  # merged across uvicorn workers in multiprocess mode
    return Response(body, media_type=content_type)
