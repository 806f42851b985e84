"""Admin endpoints: key protection, registry changes served at once, shadow comparison on logged decisions."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from decision_platform.api.app import create_app
from decision_platform.config import Settings
from decision_platform.serving.platform import Platform
from tests.model_helpers import corrupt, register_policy

KEY = "test-admin-key"
AUTH = {"X-API-Key": KEY}
ALLOW, BLOCK = 0, 2


@pytest.fixture
def admin(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform]
) -> Iterator[tuple[TestClient, Platform]]:
    """The API with DP_API_KEY set (no refresher thread: changes here are served by the call itself)."""
    platform = start_platform(make_settings(api_key=KEY, model_refresh_s=0))
    with TestClient(create_app(platform.settings, platform)) as client:
        yield client, platform


def _decide(client: TestClient, entity: str = "a1") -> dict:
    response = client.post("/decide", json={"entity_id": entity})
    assert response.status_code == 200
    return response.json()


def test_admin_is_disabled_without_a_key(client: TestClient) -> None:
    for method, path in (
        ("GET", "/admin/models"),
        ("POST", "/admin/models/rollback"),
        ("DELETE", "/admin/models/shadow"),
        ("GET", "/admin/models/compare"),
    ):
        response = client.request(method, path, headers=AUTH)
        assert response.status_code == 403, path
        assert response.json()["detail"] == "admin API disabled: set DP_API_KEY"


def test_a_missing_or_wrong_key_is_refused(admin: tuple[TestClient, Platform]) -> None:
    client, platform = admin
    champion = platform.models.versions["policy"]
    assert client.get("/admin/models").status_code == 401
    assert client.get("/admin/models", headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get("/admin/models", headers={"X-API-Key": KEY + "x"}).status_code == 401
    assert client.post("/admin/models/rollback", headers={"X-API-Key": ""}).status_code == 401
    assert platform.registry.champion("policy")["version"] == champion  # type: ignore[index]
    listed = client.get("/admin/models", headers=AUTH)
    assert listed.status_code == 200
    body = listed.json()
    assert {m["status"] for m in body["models"]} == {"champion"}
    assert body["serving"]["versions"] == platform.models.versions


def test_promote_and_rollback_are_served_by_the_next_decision(admin: tuple[TestClient, Platform]) -> None:
    client, platform = admin
    original = platform.models.versions["policy"]
    blocker = register_policy(platform.registry, BLOCK)

    response = client.post(f"/admin/models/{blocker}/promote", headers=AUTH)
    assert response.status_code == 200
    assert response.json()["serving"]["versions"]["policy"] == blocker
    body = _decide(client)
    assert body["model_versions"]["policy"] == blocker
    assert body["policy"]["proposed_action"] == BLOCK

    response = client.post("/admin/models/rollback", params={"kind": "policy"}, headers=AUTH)
    assert response.status_code == 200
    assert response.json()["rolled_back"] == {"policy": {"from": blocker, "to": original}}
    assert response.json()["serving"]["versions"]["policy"] == original
    assert _decide(client)["model_versions"]["policy"] == original

    again = client.post("/admin/models/rollback", params={"kind": "policy"}, headers=AUTH)
    assert again.status_code == 409 and "nothing to roll back to" in again.json()["detail"]
    assert client.post("/admin/models/policy-nope/promote", headers=AUTH).status_code == 404
    bad_kind = client.post("/admin/models/rollback", params={"kind": "ranking"}, headers=AUTH)
    assert bad_kind.status_code == 422


def test_shadow_is_logged_then_removed(admin: tuple[TestClient, Platform]) -> None:
    client, platform = admin
    anomaly = platform.models.versions["anomaly"]
    refused = client.post(f"/admin/models/{anomaly}/shadow", headers=AUTH)
    assert refused.status_code == 422 and "only policy models can shadow" in refused.json()["detail"]
    champion = platform.models.versions["policy"]
    assert client.post(f"/admin/models/{champion}/shadow", headers=AUTH).status_code == 409
    assert client.post("/admin/models/policy-nope/shadow", headers=AUTH).status_code == 404

    shadow = register_policy(platform.registry, BLOCK)
    response = client.post(f"/admin/models/{shadow}/shadow", headers=AUTH)
    assert response.status_code == 200
    assert response.json()["serving"]["shadow"] == {"policy": shadow}
    decision = _decide(client, "s1")
    assert decision["model_versions"]["policy"] == champion  # the champion still decides
    stored = client.get(f"/decisions/{decision['decision_id']}").json()
    assert stored["shadow"]["version"] == shadow and stored["shadow"]["action"] == BLOCK
    assert stored["propensity"] == decision["policy"]["propensity"]

    removed = client.delete("/admin/models/shadow", headers=AUTH)
    assert removed.status_code == 200
    assert removed.json()["removed"] == shadow and removed.json()["serving"]["shadow"] == {}
    after = _decide(client, "s1")
    assert client.get(f"/decisions/{after['decision_id']}").json()["shadow"] is None
    assert client.delete("/admin/models/shadow", headers=AUTH).json()["removed"] is None


def test_promoting_the_shadow_makes_it_the_champion(admin: tuple[TestClient, Platform]) -> None:
    client, platform = admin
    shadow = register_policy(platform.registry, ALLOW)
    client.post(f"/admin/models/{shadow}/shadow", headers=AUTH)
    serving = client.post(f"/admin/models/{shadow}/promote", headers=AUTH).json()["serving"]
    assert serving["versions"]["policy"] == shadow and serving["shadow"] == {}
    decision = _decide(client, "p1")
    assert decision["model_versions"]["policy"] == shadow
    assert client.get(f"/decisions/{decision['decision_id']}").json()["shadow"] is None


def test_compare_counts_agreement_and_estimates_values(admin: tuple[TestClient, Platform]) -> None:
    client, platform = admin
    empty = client.get("/admin/models/compare", headers=AUTH).json()
    assert empty["decisions"] == 0 and empty["agreement"] is None
    shadow = register_policy(platform.registry, BLOCK)
    client.post(f"/admin/models/{shadow}/shadow", headers=AUTH)
    decisions = [_decide(client, f"c{i % 7}") for i in range(30)]
    for i, decision in enumerate(decisions[:20]):
        # A good customer's blocked event did not go through: its outcome is a false positive.
        good = "false_positive" if decision["action"] == BLOCK else "success"
        outcome = "fraud" if i % 4 == 0 else good
        assert client.post(
            "/outcome", json={"decision_id": decision["decision_id"], "outcome": outcome}
        ).status_code in (200, 201)

    body = client.get("/admin/models/compare", headers=AUTH).json()
    assert body["shadow_version"] == shadow and body["decisions"] == 30
    assert sum(map(sum, body["confusion"])) == 30
    # The always-block shadow chooses block on every decision here (no rule takes block away).
    assert [row[BLOCK] for row in body["confusion"]] == [sum(row) for row in body["confusion"]]
    assert body["agreement"] == pytest.approx(body["confusion"][BLOCK][BLOCK] / 30)
    assert body["with_outcome"] == 20
    for value in (body["champion_value"], *body["shadow_values"].values(), body["difference"]):
        assert value["ci_low"] <= value["value"] <= value["ci_high"]
    assert set(body["shadow_values"]) == {"IPS", "SNIPS", "DR"}
    limited = client.get("/admin/models/compare", params={"limit": 5}, headers=AUTH).json()
    assert limited["decisions"] == 5
    future = client.get("/admin/models/compare", params={"since": "2999-01-01T00:00:00Z"}, headers=AUTH)
    assert future.json()["decisions"] == 0


def test_a_corrupt_shadow_artifact_does_not_break_decide(admin: tuple[TestClient, Platform]) -> None:
    client, platform = admin
    shadow = register_policy(platform.registry, BLOCK)
    corrupt(platform.registry, shadow)
    refused = client.post(f"/admin/models/{shadow}/shadow", headers=AUTH)
    assert refused.status_code == 409 and "hash" in refused.json()["detail"]

    platform.registry.repository.set_shadow(shadow)  # corrupt already in the registry (e.g. disk damage)
    result = platform.refresh_models()
    assert result is not None and result.applied
    assert result.shadow == {} and "hash" in (result.shadow_error or "")
    decision = _decide(client, "x1")
    assert decision["fallback"] is None
    assert client.get(f"/decisions/{decision['decision_id']}").json()["shadow"] is None
    listed = client.get("/admin/models", headers=AUTH).json()
    assert "hash" in listed["serving"]["shadow_error"]
    assert client.get("/ready").json()["status"] == "ready"


def test_a_foreign_file_in_an_artifact_directory_is_a_409_not_a_500(
    admin: tuple[TestClient, Platform], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Something left a file in a registered artifact's directory under a name that is not UTF-8 (another
    system's copy, a broken restore): hashing it raised UnicodeEncodeError, and promote answered 500 (the CLI
    a traceback). A file the hash cannot read (a disk error, removed while it is read) raised OSError the
    same way. Both are an artifact that no longer matches its hash: 409 naming it, nothing changed."""
    client, platform = admin
    champion = platform.models.versions["policy"]
    challenger = register_policy(platform.registry, BLOCK)
    directory = platform.registry.model_dir / platform.registry.record(challenger)["artifact_path"]
    stray = os.path.join(os.fsencode(directory), b"copy-\xff.npz")
    with open(stray, "wb") as handle:
        handle.write(b"x")
    refused = client.post(f"/admin/models/{challenger}/promote", headers=AUTH)
    assert refused.status_code == 409, refused.text
    assert challenger in refused.json()["detail"] and "hash" in refused.json()["detail"]
    os.remove(stray)

    def unreadable(self: Path) -> bytes:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    refused = client.post(f"/admin/models/{challenger}/promote", headers=AUTH)
    assert refused.status_code == 409, refused.text
    assert "Input/output error" in refused.json()["detail"]
    monkeypatch.undo()
    assert platform.registry.champion("policy")["version"] == champion  # type: ignore[index]
    assert client.post(f"/admin/models/{challenger}/promote", headers=AUTH).status_code == 200
