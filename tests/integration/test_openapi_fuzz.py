"""schemathesis over the live OpenAPI schema of the API: no 5xx, and every answer is one the schema documents
(status code, content type, body, headers).

The API runs under uvicorn on a local port, with an admin key so that the admin routes are exercised past
authentication; once on the embedded backends and once on the real PostgreSQL and Redis (skipped locally
when they are unreachable). The number of examples is bounded and the generation derandomized: the same
cases every run, well under a minute.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from decision_platform.api.app import create_app
from decision_platform.config import Settings
from decision_platform.serving.platform import Platform
from tests.conftest import PG_URL
from tests.live_server import serving

KEY = "fuzz-admin-key"
AUTH = {"X-API-Key": KEY}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
#: Cases sent and the statuses answered, per backend: printed at the end of the module (pytest -s).
SENT: dict[str, Counter[str]] = defaultdict(Counter)
ANSWERED: dict[str, Counter[int]] = defaultdict(Counter)


@pytest.fixture(scope="module", autouse=True)
def _summary() -> Iterator[None]:
    yield
    for name, sent in SENT.items():
        cases, statuses = sum(sent.values()), dict(sorted(ANSWERED[name].items()))
        print(f"\nschemathesis on {name}: {len(sent)} operations, {cases} cases, statuses {statuses}")


@pytest.fixture(params=["embedded", pytest.param("postgresql+redis", marks=pytest.mark.integration)])
def backend(request: pytest.FixtureRequest, make_settings: Callable[..., Settings]) -> tuple[str, Settings]:
    overrides: dict[str, object] = {"api_key": KEY, "model_refresh_s": 0}
    if request.param == "postgresql+redis":
        overrides.update(
            database_url=PG_URL,
            database_schema=request.getfixturevalue("pg_schema"),
            feature_store_url=request.getfixturevalue("redis_db"),
        )
    return request.param, make_settings(**overrides)


@pytest.fixture
def live_url(backend: tuple[str, Settings], start_platform: Callable[[Settings], Platform]) -> Iterator[str]:
    app = create_app(backend[1], start_platform(backend[1]))
    with serving(app) as url:
        yield url


# Built from the app's own schema at import: schemathesis' lazy fixture loader does not run on pytest 9
# (it sets Function._nodeid). The live server serves this very schema (checked below).
SCHEMA_DOCUMENT = create_app(Settings(api_key=KEY)).openapi()
schema = schemathesis.openapi.from_dict(SCHEMA_DOCUMENT)


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,  # one server per operation and backend, not per example
    ],
)
def test_every_answer_is_documented_and_none_is_a_server_error(
    case: schemathesis.Case, backend: tuple[str, Settings], live_url: str
) -> None:
    response = case.call_and_validate(base_url=live_url, headers=AUTH, checks=CHECKS, timeout=10)
    SENT[backend[0]][case.operation.label] += 1
    ANSWERED[backend[0]][response.status_code] += 1


def test_the_fuzzed_schema_is_the_one_the_server_serves(live_url: str) -> None:
    assert httpx.get(f"{live_url}/openapi.json", timeout=10).json() == SCHEMA_DOCUMENT
