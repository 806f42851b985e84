"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    model_validator,
)

from decision_platform.core.events import INT64_MAX, STORABLE, AttributeValue, Event, Identifier


def _not_a_bool(value: Any) -> Any:
    # Lax int parsing reads true as 1: the id of some other decision.
    if isinstance(value, bool):
        raise ValueError("must be an integer id, not true or false")
    return value


#: Ids are signed 64-bit in the database (BIGINT): a larger one can name no decision. Text of digits is
#: accepted (JavaScript clients cannot hold a 64-bit integer), true / false is not.
DecisionId = Annotated[int, Field(gt=0, le=INT64_MAX), BeforeValidator(_not_a_bool)]


class FieldError(BaseModel):
    field: str = Field(description="dotted path of the offending field, e.g. event.attributes.k")
    message: str


class ErrorBody(BaseModel):
    """Every error answer (4xx, 5xx)."""

    detail: str


class ValidationErrorBody(ErrorBody):
    """422: what is wrong with the request, one entry per field."""

    errors: list[FieldError] = Field(description="absent when the error is not about one field", default=[])


class DecideRequest(BaseModel):
    """Decide on an entity now, or on one of its events (which also updates its windows, once)."""

    model_config = ConfigDict(extra="forbid")
    entity_id: Identifier
    event: Event | None = None

    @model_validator(mode="before")
    @classmethod
    def _event_inherits_entity(cls, data: Any) -> Any:
        # The event's entity is the request's: let callers omit it, refuse a contradiction.
        if isinstance(data, dict) and isinstance(data.get("event"), dict):
            event = dict(data["event"])
            if "entity_id" not in event and "entity_id" in data:
                event["entity_id"] = data["entity_id"]
            elif "entity_id" in data and event.get("entity_id") != data["entity_id"]:
                raise ValueError("event.entity_id differs from entity_id")
            data = {**data, "event": event}
        return data


class TypicalRange(BaseModel):
    low: float
    high: float
    scope: str = Field(description="population: legitimate training traffic; entity: its recent decisions")


class Reason(BaseModel):
    feature: str
    value: float
    direction: str = Field(description="raises_risk | lowers_risk | raises_anomaly")
    weight: float = Field(
        description="kind risk: share of the risk log-odds (DeepLIFT vs. an average event; the shares of all "
        "inputs add up to the log-odds' move); "
        "kind anomaly: share of the anomaly score above what typical values would give (Shapley)"
    )
    description: str
    kind: str = "risk"
    display: str | None = None
    typical: TypicalRange | None = None
    text: str | None = Field(None, description='e.g. "25 events in the last minute (typical: 1 to 2)"')


class RuleInput(BaseModel):
    feature: str
    value: float | str
    display: str
    typical: TypicalRange | None = None


class FiredRuleOut(BaseModel):
    name: str
    tier: str
    description: str
    inputs: list[RuleInput] = Field([], description="What the rule tested, with values and normal ranges.")


class PolicyOut(BaseModel):
    proposed_action: int | None = Field(description="The policy's own choice (argmax), before rules.")
    probabilities: list[float] | None = Field(description="The policy's action probabilities.")
    propensity: float = Field(description="Probability with which the final action was chosen.")
    decided_by: str = Field(description="policy | rule | fallback")


class DecisionResponse(BaseModel):
    decision_id: int
    entity_id: str
    action: int = Field(description="0 allow, 1 throttle, 2 block")
    action_name: str
    risk: float | None = Field(description="P(bad), 0..1; null when the decision fell back before scoring")
    anomaly: float | None
    explanation: str
    reasons: list[Reason]
    rules: list[FiredRuleOut]
    fallback: str | None
    policy: PolicyOut
    model_versions: dict[str, str]
    latency_ms: float


class OutcomeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decision_id: DecisionId
    outcome: Annotated[str, StringConstraints(min_length=1, max_length=32), STORABLE]


class OutcomeResponse(BaseModel):
    decision_id: int
    outcome: str
    reward: float
    received_at: str
    created: bool = Field(description="false when this exact outcome had already been recorded")


class EventBatch(BaseModel):
    """``POST /events``: one event, or ``{"events": [...]}`` (at most 1000)."""

    model_config = ConfigDict(extra="forbid")
    events: list[Event] = Field(min_length=1, max_length=1000)


def _event_or_batch(value: Any) -> str:
    return "EventBatch" if isinstance(value, dict) and "events" in value else "Event"


#: ``POST /events``'s body: a batch when it has ``events``, else one event. Told apart by that key: as a
#: plain union, a bad event was answered with both members' errors ("Event.timestamp: ...; EventBatch.events:
#: Field required; EventBatch.event_id: Extra inputs are not permitted; ..."), the real one lost among them.
#: The tags keep the field names of the errors ("Event.timestamp", "EventBatch.events.0.amount").
EventsBody = Annotated[
    Annotated[Event, Tag("Event")] | Annotated[EventBatch, Tag("EventBatch")],
    Discriminator(_event_or_batch),
]


class EventsAccepted(BaseModel):
    accepted: int = Field(description="Events acknowledged: by the broker, or processed in-process.")
    mode: str = Field(description="kafka | in-process")
    decision_ids: list[int | None] | None = Field(
        None,
        description="In-process mode only: each event's decision (Kafka mode decides asynchronously); null "
        "for an event refused because another entity's event, or one of the entity's with another amount, "
        "type or attributes, holds its event_id (dead-lettered).",
    )


class ExplanationResponse(BaseModel):
    """``GET /decisions/{id}/explanation``: the narrative and the facts it was written from."""

    decision_id: int
    status: str = Field(description="ready | pending (still being written: the template meanwhile)")
    narrative: str
    source: str = Field(description="llm | template")
    reason: str | None = Field(
        description="why the template: no_llm, llm_starting (the model is being fetched / started), "
        "grounding_rejected, llm_timeout, llm_error, llm_unavailable, queue_full, pending, no_choice (no "
        "fact the model could choose), stored_damaged (the stored narrative's row holds what the narrator "
        "never writes); null for an LLM narrative"
    )
    model: str | None = None
    prompt_version: str | None = None
    latency_ms: float | None = None
    grounding: dict[str, Any] | None = None
    facts: dict[str, Any]
    created_at: str | None = None


class StoredDecision(BaseModel):
    """``GET /decisions/{id}``: the stored record (the ``decisions`` table), as written at decision time."""

    id: int
    entity_id: str
    event_id: str | None
    created_at: str = Field(description="ISO 8601")
    features: dict[str, float] = Field(description="The exact vector the models saw.")
    amount: float | None
    anomaly: float | None
    risk: float | None
    probabilities: list[float] | None
    proposed_action: int | None
    action_mask: list[bool] = Field(description="Actions the rules allowed: [allow, throttle, block].")
    action: int
    propensity: float
    decided_by: str
    rules_fired: list[FiredRuleOut]
    fallback: str | None
    model_versions: dict[str, str]
    reasons: list[Reason]
    explanation: str
    explanation_source: str
    latency_ms: float
    event_type: str | None
    attributes: dict[str, AttributeValue] | None
    shadow: dict[str, Any] | None = Field(
        description="A shadow policy's choice: version, action, probabilities."
    )


_ERROR_DESCRIPTIONS = {
    400: "The body cannot be parsed: not UTF-8, JSON nested too deeply, or a number of over 4300 digits",
    401: "Missing or wrong X-API-Key",
    403: "Admin API disabled: no DP_API_KEY configured",
    404: "Not found",
    409: "Conflict with the stored state",
    413: "Request body larger than DP_MAX_BODY_BYTES",
    422: "Invalid input; `errors` names each offending field",
    500: "Internal error (logged)",
    503: "A dependency (database, feature store, broker) is unavailable; retry after Retry-After seconds",
}
RETRY_AFTER_HEADER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route: the error answers it really gives, with the app's real bodies.

    Declaring 422 here also keeps FastAPI from documenting its own HTTPValidationError, which the app
    never sends. 500 is added to all: any route can fail unexpectedly.
    """
    responses: dict[int | str, dict[str, Any]] = {}
    for code in sorted({*codes, 500}):
        entry: dict[str, Any] = {
            "model": ValidationErrorBody if code == 422 else ErrorBody,
            "description": _ERROR_DESCRIPTIONS[code],
        }
        if code == 503:
            entry["headers"] = RETRY_AFTER_HEADER
        responses[code] = entry
    return responses
