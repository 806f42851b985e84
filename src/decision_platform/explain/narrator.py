"""Narratives written off the hot path by one background thread, checked, then cached in the database.

``/decide`` only hands the narrator its decision (``submit``: a deque append under a lock, never a wait;
when the eager queue is full the decision is simply explained on first request instead). The thread
takes requested decisions first (``GET /decisions/{id}/explanation``), then eager ones (throttles and
blocks by default: the decisions someone will ask about). One thread, because the LLM server has one
slot: a second concurrent narrative would only make both late.

An embedded model (``embedded://``) is fetched and started by that thread before it takes any work, which
the first time takes minutes: meanwhile every request gets the template at once (reason
``llm_starting``), and the narrator switches to the LLM when the server answers. ``active`` (in /ready and
``dp_narrator_active``) says which narrator writes now.

Per narrative: facts -> prompt -> LLM (bounded by a timeout) -> grounding check -> stored with its model,
prompt version, latency and grounding result. With the structured prompt (``narrative-v2``) the LLM
answers a JSON choice of facts, constrained by a schema, and the narrative is rendered from the facts
(explain/structured.py) before the same check. A narrative that fails the check is retried once with the
problems spelled out; if it fails again the template narrative is stored instead, marked so, and the
rejection counted. A timeout or a dead server is not stored (it says nothing about this decision): the
caller gets the template with the reason, and the LLM is left alone for ``llm_retry_after_s`` so that a
dead server costs nothing per request.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from datetime import UTC, datetime
from typing import Any, TypeVar

from decision_platform.config import Settings
from decision_platform.core.records import DecisionRecord
from decision_platform.explain import structured
from decision_platform.explain.facts import Facts, build_facts
from decision_platform.explain.grounding import check
from decision_platform.explain.llm import ChatClient, ChatResult, LLMError, LLMTimeout
from decision_platform.explain.prompt import build_messages, retry_messages, template
from decision_platform.models.ranges import FeatureRanges
from decision_platform.observability import metrics
from decision_platform.storage.decisions import intact, typical_range
from decision_platform.storage.errors import DatabaseUnavailable
from decision_platform.storage.repository import Repository
from decision_platform.storage.writer import DecisionWriter

T = TypeVar("T")

log = logging.getLogger(__name__)

READY, PENDING = "ready", "pending"
#: What ``Narrator.active`` can be.
LLM, STARTING, TEMPLATE = "llm", "starting", "template"
#: Tokens a structured answer needs at most (four ids in a JSON list); a free narrative uses the setting.
STRUCTURED_MAX_TOKENS = 80
#: Bound of the narrator's memory: requested ids in the queue.
MAX_URGENT = 256
#: Why the template is served for a decision whose stored narrative is damaged (Explanation.from_stored).
STORED_DAMAGED = "stored_damaged"
#: ``dp_damaged_rows_total{reader}`` of an explanation: its decision, and its stored narrative.
EXPLANATION_READER = "explanation"
STORED_EXPLANATION_READER = "stored explanation"


@dataclass
class Explanation:
    """What ``GET /decisions/{id}/explanation`` returns."""

    decision_id: int
    status: str  # ready | pending
    narrative: str
    source: str  # llm | template
    #: Why the template is served: no_llm, llm_starting, grounding_rejected, llm_timeout, llm_error,
    #: llm_unavailable, queue_full, pending, no_choice, stored_damaged. None for an LLM narrative.
    reason: str | None
    facts: dict[str, Any]
    model: str | None = None
    prompt_version: str | None = None
    latency_ms: float | None = None
    grounding: dict[str, Any] | None = None
    created_at: datetime | None = None

    @classmethod
    def from_stored(cls, row: Mapping[str, Any]) -> Explanation | None:
        """A stored narrative, or None when its row holds what the narrator never writes (a hand edit, an
        older version: facts that are not the facts of a decision, grounding that is not an object ...);
        counted in ``dp_damaged_rows_total{reader="stored explanation"}`` and logged. Its reader serves the
        template from the decision instead (reason ``stored_damaged``): the decision is intact and the
        narrative is derived from it, so a 409 would withhold what can be said. The damaged row stays as it
        is (narratives are written once): it is evidence, not a cache to overwrite."""
        for column, intact_value in _STORED.items():
            if not intact_value(row.get(column)):
                shown = repr(row.get(column))[:80]
                metrics.DAMAGED_ROWS.labels(reader=STORED_EXPLANATION_READER).inc()
                log.warning(
                    "the explanation of decision %s is stored damaged: %s holds %s; the template is served",
                    row.get("decision_id"),
                    column,
                    shown,
                )
                return None
        return cls.from_row(row)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Explanation:
        grounding = row.get("grounding") or {}
        return cls(
            decision_id=int(row["decision_id"]),
            status=READY,
            narrative=row["narrative"],
            source=row["source"],
            reason=None if row["source"] == "llm" else grounding.get("reason", "grounding_rejected"),
            facts=row["facts"],
            model=row.get("model"),
            prompt_version=row.get("prompt_version"),
            latency_ms=row.get("latency_ms"),
            grounding=grounding,
            created_at=row.get("created_at"),
        )

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["created_at"] = self.created_at.isoformat() if self.created_at else None
        return out


#: Facts a stored narrative cannot be read without (``Facts.from_dict``).
_REQUIRED_FACTS = frozenset(
    f.name for f in fields(Facts) if f.default is MISSING and f.default_factory is MISSING
)
#: What the readers of a stored narrative take for granted of each column (its API answer, the console's
#: decision page, ``decision-platform explain``): what the narrator writes (``Narrator._row``).
_STORED: dict[str, Callable[[Any], bool]] = {
    "narrative": lambda v: isinstance(v, str),
    "source": lambda v: isinstance(v, str),
    "model": lambda v: v is None or isinstance(v, str),
    "prompt_version": lambda v: v is None or isinstance(v, str),
    "latency_ms": lambda v: v is None or (isinstance(v, int | float) and not isinstance(v, bool)),
    "grounding": lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("reason") or "", str)),
    "facts": lambda v: (
        isinstance(v, dict)
        and v.keys() >= _REQUIRED_FACTS
        and typical_range(v.get("risk_typical"))
        and typical_range(v.get("anomaly_typical"))
    ),
}


def clean(text: str, truncated: bool = False) -> str:
    """The narrative as served: one paragraph, no markdown emphasis, no wrapping quotes, and no sentence
    cut off by the token limit (a half-written "213." would read as a wrong number)."""
    text = re.sub(r"[*_`#]{2,}|^#+\s*", "", text.strip())
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    if truncated or (text and text[-1] not in ".!?\"')"):
        complete = re.match(r"^(.*[.!?])\s", text if truncated else text + " ", re.S)
        if complete:
            text = complete.group(1).strip()
    return text


class Narrator:
    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        client: ChatClient | None,
        ranges: FeatureRanges | None = None,
        writer: DecisionWriter | None = None,
    ) -> None:
        self.settings = settings
        self.repository = repository
        #: With a writer, decisions still in its spool are explained too, and every read is bounded.
        self.writer = writer
        self.client = client
        self.ranges = ranges
        self.prompt_version = template(settings.llm_prompt_version).version  # fails fast on a bad setting
        self._cond = threading.Condition()
        self._urgent: deque[int] = deque()
        self._eager: deque[int] = deque()
        self._records: dict[int, DecisionRecord] = {}
        self._inflight: dict[int, threading.Event] = {}
        self._transient: OrderedDict[int, Explanation] = OrderedDict()
        self._down_until = 0.0
        self._stopped = False
        self._thread: threading.Thread | None = None
        #: Why the LLM could not be started (embedded: weights or server), if it could not.
        self.start_error: str | None = None
        self.active = TEMPLATE
        self._set_active(TEMPLATE if client is None else STARTING if _needs_start(client) else LLM)

    # --- lifecycle
    def start(self) -> Narrator:
        if self.client is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="narrator", daemon=True)
            self._thread.start()
        return self

    def _set_active(self, active: str) -> None:
        model = self.client.model if self.client is not None else ""
        for state in (LLM, STARTING, TEMPLATE):
            metrics.NARRATOR_ACTIVE.labels(narrator=state, model=model).set(1 if state == active else 0)
        self.active = active

    def status(self) -> dict[str, Any]:
        """What /ready shows: the narrator writing now, its backend and model, and a start failure."""
        out: dict[str, Any] = {"active": self.active, "prompt_version": self.prompt_version}
        if self.client is not None:
            out |= {"backend": self.client.backend, "model": self.client.model}
        if self.start_error:
            out["error"] = self.start_error
        return out

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self.client is not None:
            self.client.close()  # also ends a call in flight on an embedded server
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- the hot path's only call
    def submit(self, record: DecisionRecord) -> bool:
        """Queue a just-made decision for an eager narrative; never blocks. False if not queued."""
        decision_id = record.id
        with self._cond:
            if self.client is None or record.action not in self.settings.llm_eager_actions:
                return False
            if len(self._eager) >= self.settings.llm_queue_size or decision_id in self._inflight:
                return False
            self._eager.append(decision_id)
            self._records[decision_id] = record
            self._inflight[decision_id] = threading.Event()
            self._cond.notify()
        return True

    # --- reads
    def facts_for(self, record: DecisionRecord) -> Facts:
        decision_id = record.id
        # The event as stored with the decision (older records: only what a rule tested).
        attributes = dict(record.attributes or {})
        for rule in record.rules_fired or ():  # attributes a rule tested are in the record itself
            for item in rule.get("inputs") or ():
                if item["feature"].startswith("attributes."):
                    attributes.setdefault(item["feature"].split(".", 1)[1], item["value"])
        try:

            def recent() -> list[dict[str, float]]:
                return self.repository.recent_features(record.entity_id, decision_id)

            history = self.writer.query(recent) if self.writer else recent()
        except Exception as exc:  # entity ranges are a nicety: never fail an explanation for them
            log.warning("no entity history for %s: %s", decision_id, exc.__class__.__name__)
            history = []
        return build_facts(record, history, self.ranges, attributes, record.event_type or "")

    def explanation(
        self, decision_id: int, wait: bool = False, timeout_s: float | None = None
    ) -> Explanation | None:
        """The narrative of a decision: stored, or being written (pending, with the template meanwhile).
        None when there is no such decision; ``DamagedDecisionError`` when it is stored damaged."""
        stored = self._stored(decision_id)
        explanation = Explanation.from_stored(stored) if stored is not None else None
        if explanation is not None:
            return explanation
        record = (
            self.writer.find_decision(decision_id)
            if self.writer
            else self.repository.get_decision(decision_id)
        )
        if record is None:
            return None
        facts = self._facts_or_template(record, stored)
        if isinstance(facts, Explanation):
            return facts
        if self.active != LLM:  # being fetched / started, or it failed to: the template now, not a wait
            return self._template(
                facts, READY, "llm_starting" if self.active == STARTING else "llm_unavailable"
            )
        with self._cond:
            transient = self._transient.pop(decision_id, None)
            if transient is not None:
                return transient
            done = self._inflight.get(decision_id)
            if done is None:
                if time.monotonic() < self._down_until:
                    return self._template(facts, READY, "llm_unavailable")
                if len(self._urgent) >= MAX_URGENT:
                    return self._template(facts, PENDING, "queue_full")
                done = self._inflight[decision_id] = threading.Event()
                self._records[decision_id] = record
                self._urgent.append(decision_id)
                self._cond.notify()
            elif decision_id in self._eager:  # asked for: move it ahead of the eager ones
                self._eager.remove(decision_id)
                self._urgent.append(decision_id)
        if wait:
            limit = self.settings.llm_wait_timeout_s
            done.wait(min(timeout_s if timeout_s is not None else limit, limit))
        stored = self._stored(decision_id)
        if stored is not None:
            return Explanation.from_row(stored)
        with self._cond:
            transient = self._transient.pop(decision_id, None)
        return transient or self._template(facts, PENDING, "pending")

    def explanation_now(self, record: DecisionRecord) -> Explanation:
        """The narrative of a decision, written now if none is stored (``decision-platform explain``: one
        decision, no background worker). The same choice as :meth:`explanation`: a stored narrative as it
        was served; a narrative stored damaged, or no LLM, gives the template; else the LLM writes one,
        checked and stored, or the template if it failed. ``DamagedDecisionError`` for a damaged record."""
        stored = self.repository.get_explanation(record.id)
        explanation = Explanation.from_stored(stored) if stored is not None else None
        if explanation is not None:
            return explanation
        facts = self._facts_or_template(record, stored)
        if isinstance(facts, Explanation):
            return facts
        result = self.generate(facts)
        if isinstance(result, Explanation):
            return result
        self.repository.insert_explanation(result)
        return Explanation.from_row(result)

    def _facts_or_template(
        self, record: DecisionRecord, stored: dict[str, Any] | None
    ) -> Facts | Explanation:
        """For a decision with no usable stored narrative (``stored``: the row of one stored damaged, or
        None): the template when no LLM may write one, else the facts it is to be written from. A damaged
        decision raises DamagedDecisionError naming it (the API's 409), not a traceback from the facts."""
        facts = self.facts_for(intact(record, EXPLANATION_READER))
        if stored is not None:  # its narrative is stored damaged: the template, never a second narrative
            return self._template(facts, READY, STORED_DAMAGED)
        if self.client is None:
            return self._template(facts, READY, "no_llm")
        return facts

    def _stored(self, decision_id: int) -> dict[str, Any] | None:
        """The stored narrative; None while the database is unavailable (the template is given meanwhile)."""
        if self.writer is None:
            return self.repository.get_explanation(decision_id)
        try:
            return self.writer.query(lambda: self.repository.get_explanation(decision_id))
        except DatabaseUnavailable:
            return None

    def _template(self, facts: Facts, status: str, reason: str) -> Explanation:
        return Explanation(
            facts.decision_id, status, facts.template_narrative(), "template", reason, facts.to_dict()
        )

    # --- the worker
    def _run(self) -> None:
        if self.active == STARTING:
            client = self.client
            assert client is not None
            started = time.monotonic()
            log.info("narrator: starting the LLM (%s); template narratives meanwhile", client.model)
            try:
                client.prepare()  # type: ignore[attr-defined]  # checked by _needs_start
            except Exception as exc:  # any failure to start leaves the template, said in /ready and the log
                self.start_error = str(exc)[:300]
                log.error("narrator: the LLM could not be started, template narratives only: %s", exc)
                self._set_active(TEMPLATE)
                return
            log.info(
                "narrator: the LLM is ready after %.0f s; narratives from it now", time.monotonic() - started
            )
            self._set_active(LLM)
        while True:
            with self._cond:
                while not (self._stopped or self._urgent or self._eager):
                    self._cond.wait()
                if self._stopped:
                    return
                decision_id = (self._urgent or self._eager).popleft()
                record = self._records.pop(decision_id, None)
            try:
                self._process(decision_id, record)
            except DatabaseUnavailable as exc:  # an outage, not a bug: one line, no traceback
                log.warning("narrative of decision %s not stored: %s", decision_id, exc.reason)
            except Exception:
                log.exception("narrative of decision %s failed", decision_id)
            finally:
                with self._cond:
                    done = self._inflight.pop(decision_id, None)
                if done is not None:
                    done.set()

    def _db(self, call: Callable[[], T]) -> T:
        """A database call of the narrator's thread, bounded as a request's read is (with a writer): at once
        while the database is known to be down, within DP_DB_READ_TIMEOUT_S when it stalls. Unbounded, a
        frozen PostgreSQL held the thread for the whole freeze -- every narrative behind it, and its stop."""
        return self.writer.query(call) if self.writer is not None else call()

    def _process(self, decision_id: int, record: DecisionRecord | None) -> None:
        if self._db(lambda: self.repository.get_explanation(decision_id)) is not None:
            return
        record = record or self._db(lambda: self.repository.get_decision(decision_id))
        if record is None:
            return
        facts = self.facts_for(record)
        if time.monotonic() < self._down_until:
            self._keep_transient(self._template(facts, READY, "llm_unavailable"))
            return
        result = self.generate(facts)
        if isinstance(result, Explanation):
            self._keep_transient(result)
        else:
            self._db(lambda: self.repository.insert_explanation(result))

    def _keep_transient(self, explanation: Explanation) -> None:
        with self._cond:
            self._transient[explanation.decision_id] = explanation
            while len(self._transient) > MAX_URGENT:
                self._transient.popitem(last=False)

    def generate(self, facts: Facts) -> dict[str, Any] | Explanation:
        """Write and check a narrative: the row to store, or a transient template (LLM failed)."""
        assert self.client is not None
        prompt = template(self.prompt_version)
        answer_schema = structured.schema(facts) if prompt.structured else None
        started = time.perf_counter()
        if prompt.structured and answer_schema is None:  # a fallback with no rule: nothing to choose
            return self._row(
                facts,
                facts.template_narrative(),
                "template",
                None,
                started,
                {"passed": True, "attempts": 0, "problems": [], "rejected": [], "reason": "no_choice"},
            )
        messages = build_messages(facts, self.prompt_version)
        rejected: list[dict[str, Any]] = []
        usage: dict[str, int] = {}
        model = self.client.model
        max_tokens = (
            min(STRUCTURED_MAX_TOKENS, self.settings.llm_max_tokens)
            if prompt.structured
            else self.settings.llm_max_tokens
        )
        for attempt in (1, 2):
            try:
                answer = self.client.chat(
                    messages,
                    max_tokens=max_tokens,
                    temperature=0.0 if attempt == 1 else 0.3,
                    schema=answer_schema,
                )
            except LLMError as exc:
                if self._stopped:  # close() ended the call: nothing to say about the LLM or this decision
                    return self._template(facts, READY, "llm_unavailable")
                kind = "timeout" if isinstance(exc, LLMTimeout) else "error"
                metrics.LLM_LATENCY.observe(time.perf_counter() - started)
                metrics.LLM_NARRATIVES.labels(result=kind).inc()
                self._down_until = time.monotonic() + self.settings.llm_retry_after_s
                log.warning("LLM narrative of %s: %s", facts.decision_id, exc)
                explanation = self._template(facts, READY, f"llm_{kind}")
                explanation.grounding = {"error": str(exc)[:300]}
                return explanation
            metrics.LLM_LATENCY.observe(answer.latency_s)
            _add_usage(usage, answer)
            model = answer.model
            chosen: list[str] | None = None
            if prompt.structured:
                try:
                    chosen = structured.parse(answer.text, facts)
                except structured.ParseError as exc:
                    problems = [str(exc)]
                    rejected.append({"narrative": answer.text[:1000], "problems": problems})
                    messages = retry_messages(messages, answer.text, problems, facts, self.prompt_version)
                    continue
                text = structured.render(facts, chosen)
            else:
                text = clean(answer.text, answer.truncated)
            grounding = check(text, facts, self.settings.llm_max_chars)
            if grounding.passed:
                metrics.LLM_NARRATIVES.labels(result="accepted").inc()
                result = {"passed": True, "attempts": attempt, "problems": [], "rejected": rejected}
                return self._row(facts, text, "llm", answer.model, started, result | _extra(chosen, usage))
            rejected.append({"narrative": text[:1000], "problems": grounding.problems})
            reply = answer.text if prompt.structured else text
            messages = retry_messages(messages, reply, grounding.problems, facts, self.prompt_version)
        metrics.LLM_NARRATIVES.labels(result="rejected").inc()
        return self._row(
            facts,
            facts.template_narrative(),
            "template",
            model,  # the model whose narratives were refused
            started,
            {
                "passed": False,
                "attempts": 2,
                "problems": rejected[-1]["problems"],
                "rejected": rejected,
                "reason": "grounding_rejected",
            }
            | _extra(None, usage),
        )

    def _row(
        self,
        facts: Facts,
        narrative: str,
        source: str,
        model: str | None,
        started: float,
        grounding: dict[str, Any],
    ) -> dict[str, Any]:
        return {
            "decision_id": facts.decision_id,
            "narrative": narrative,
            "source": source,
            "model": model[:200] if model else None,
            "prompt_version": self.prompt_version,
            "latency_ms": round((time.perf_counter() - started) * 1000.0, 1),
            "grounding": grounding,
            "facts": facts.to_dict(),
            "created_at": datetime.now(UTC),
        }


def _needs_start(client: ChatClient) -> bool:
    """A backend started by the platform itself (embedded): slow to be ready, so started in the background."""
    return callable(getattr(client, "prepare", None))


def _add_usage(usage: dict[str, int], answer: ChatResult) -> None:
    for key in ("prompt_tokens", "cached_tokens", "completion_tokens"):
        value = getattr(answer, key)
        if value is not None:
            usage[key] = usage.get(key, 0) + int(value)


def _extra(chosen: list[str] | None, usage: dict[str, int]) -> dict[str, Any]:
    """What the stored grounding adds: the facts the model chose, and the tokens it took."""
    out: dict[str, Any] = {"usage": usage} if usage else {}
    if chosen is not None:
        out["chosen"] = chosen
    return out
