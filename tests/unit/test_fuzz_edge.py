"""Fuzzing red team (s27): what a property-based / random pass over the inputs found, one regression each,
and the bounded fuzzers themselves (fixed seeds: the same cases every run, a few seconds each).

The principle (README "Status"): bad input is a 4xx whose body names the problem, never a 5xx or a
traceback; whatever is accepted is stored.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from decision_platform.api.app import create_app
from decision_platform.config import ConfigError, Settings, load_config_file
from decision_platform.rules.ruleset import RulesError, RuleSet
from decision_platform.serving.platform import Platform

JSON = {"content-type": "application/json"}


def _detail(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["detail"]


# --- POST bodies Python's JSON parser reads but no field can hold


@pytest.mark.parametrize("path", ["/decide", "/outcome", "/events"])
def test_a_number_of_thousands_of_digits_is_400_saying_so(client: TestClient, path: str) -> None:
    """Python's int() refuses more than 4300 digits: FastAPI answered 400 "There was an error parsing
    the body", which names nothing."""
    raw = b'{"entity_id": "a", "decision_id": ' + b"1" * 4400 + b"}"
    for content_type in ("application/json", "application/vnd.test+json"):  # the lane and the route
        response = client.post(path, content=raw, headers={"content-type": content_type})
        assert _detail(response, 400) == "a number in the JSON has more than 4300 digits"


@pytest.mark.parametrize(
    ("path", "raw", "field", "text"),
    [
        ("/decide", b'{"entity_id": "a", "\\ud800x": 1}', "body", "\\ud800x"),
        ("/decide", b'{"entity_id": "a\\udfff"}', "entity_id", "a\\udfff"),
        ("/outcome", b'{"decision_id": 1, "outcome": "x", "\\ud800": 1}', "body", "\\ud800"),
        ("/events", b'{"event_id": "e", "entity_id": "b", "\\ud800": 1}', "Event", "\\ud800"),
        (
            "/events",
            b'{"events": [{"event_id": "e\\ud800", "entity_id": "b"}]}',
            "EventBatch.events.0.event_id",
            "e\\ud800",
        ),
    ],
)
def test_a_lone_surrogate_in_an_id_or_a_key_is_422_saying_so(
    client: TestClient, path: str, raw: bytes, field: str, text: str
) -> None:
    """Was "Input should be a valid string, unable to parse raw data as a unicode string" (and for a key,
    at "body" only): the client could not tell what was wrong, or where."""
    response = client.post(path, content=raw, headers=JSON)
    assert response.status_code == 422, response.text
    message = f"'{text}': must not contain lone surrogates (\\ud800-\\udfff): not valid UTF-8"
    assert response.json()["errors"] == [{"field": field, "message": message}]


# --- the console: what a browser (or anyone) can put in its cookies and forms


@pytest.fixture
def locked_console(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform]
) -> Iterator[TestClient]:
    """The app with a console password (sessions and CSRF tokens are checked)."""
    settings = make_settings(console_password="pw", api_key="k", model_refresh_s=0)
    with TestClient(create_app(settings, start_platform(settings))) as client:
        yield client


def test_a_non_ascii_session_cookie_or_csrf_token_is_refused_not_a_500(locked_console: TestClient) -> None:
    """secrets.compare_digest raises TypeError on non-ASCII text: a cookie "1.a.é" or a form's csrf "é"
    was a 500 (and a traceback in the log)."""
    client = locked_console
    cookie = [("cookie", "dp_console_session=1.a.\u00e9".encode("latin-1"))]
    answer = client.get("/console/queue", headers=cookie, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"].startswith("/console/login")
    client.get("/console/login")  # sets the CSRF nonce cookie
    answer = client.post("/console/login", data={"csrf": "\u00e9", "password": "pw"})
    assert answer.status_code == 403 and "CSRF" in answer.json()["detail"]


@pytest.mark.parametrize(
    ("rules_text", "words"),
    [
        ("a: [" * 1000, "nested too deeply"),
        ("rules:\n- {name: x, tier: block, when: 'true', description: " + "9" * 5000 + "}", "4300 digits"),
        ("lists:\n  l: [2001-13-01]\n", "month must be in 1..12"),
    ],
)
def test_a_what_if_rules_text_yaml_cannot_hold_is_422_naming_it(
    client: TestClient, rules_text: str, words: str
) -> None:
    """The console's what-if editor (and ``rules backtest``, and a rules.yaml at start): YAML nested a
    thousand deep raised RecursionError, a date 2001-13-01 or an integer of 5000 digits ValueError from the
    YAML loader itself -- each a 500 (the page catches only RulesError)."""
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/console/whatif").text)
    assert csrf is not None
    answer = client.post("/console/whatif", data={"csrf": csrf.group(1), "rules_text": rules_text})
    assert answer.status_code == 422 and words in html.unescape(answer.text), answer.text[-2000:]


def test_a_rule_nested_too_deeply_for_the_column_evaluator_is_left_to_cel() -> None:
    """``!!!!...true`` 5000 deep compiles in CEL, but the batch evaluator's parser recursed (RecursionError,
    a 500 on the what-if page)."""
    text = "rules:\n- {name: deep, tier: block, when: '" + "!" * 5000 + "true'}\n"
    rules = RuleSet.from_text(text, ["amount"])
    assert rules.vectorised == [] and rules.evaluate({}).mask == (False, False, True)


def test_a_config_file_nested_too_deeply_stops_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("a: [" * 1000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config_file(path, lambda p: RuleSet.load(p, ["amount"]))


# --- configuration files: YAML that parses, but says two things at once


@pytest.mark.parametrize(
    ("name", "text", "said"),
    [
        (
            "rules.yaml",
            "rules:\n- {name: big, tier: block, when: 'amount > 5000.0'}\nlists: {}\nrules: []\n",
            "line 4, column 1: found duplicate key 'rules' (first at line 1)",
        ),
        (
            "rules.yaml",
            "rules:\n- name: big\n  tier: block\n  when: amount > 5000.0\n  when: 'false'\n",
            "line 5, column 3: found duplicate key 'when' (first at line 4)",
        ),
        ("rewards.yaml", "outcomes: {}\noutcomes: {}\n", "found duplicate key 'outcomes'"),
        ("features.yaml", "windows: {1m: 60, 1m: 120}\n", "found duplicate key '1m'"),
        ("learning.yaml", "gate: {}\ngate: {}\n", "found duplicate key 'gate'"),
    ],
)
def test_a_config_key_given_twice_stops_with_one_line_naming_both(
    tmp_path: Path, name: str, text: str, said: str
) -> None:
    """YAML kept the last of two equal keys without a word: a second ``rules:`` section (a paste, a merge)
    dropped every block rule of the first, a second ``when:`` silently replaced a rule's condition, and
    the platform served without them. Now the file is refused, naming both lines."""
    from decision_platform.core.rewards import RewardTable
    from decision_platform.features import FeatureSpec
    from decision_platform.learning.config import LearningConfig

    loaders: dict[str, Callable[[Path], object]] = {
        "rules.yaml": lambda p: RuleSet.load(p, ["amount"]),
        "rewards.yaml": RewardTable.load,
        "features.yaml": FeatureSpec.load,
        "learning.yaml": LearningConfig.load,
    }
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_config_file(path, loaders[name])
    assert said in str(refused.value)
    if name == "rules.yaml":  # the console's what-if and `rules backtest` read the same way
        with pytest.raises(RulesError, match="found duplicate key"):
            RuleSet.from_text(text, ["amount"])


def test_yaml_merge_keys_still_override_what_they_merge() -> None:
    """An anchor merged with ``<<`` and a key of its own is no duplicate: the usual YAML override."""
    text = (
        "rules:\n- &base {name: a, tier: block, when: 'amount > 1.0'}\n"
        "- {<<: *base, name: b, when: 'amount > 2.0'}\n"
    )
    rules = RuleSet.from_text(text, ["amount"])
    assert [(r.name, r.tier, r.when) for r in rules.rules] == [
        ("a", "block", "amount > 1.0"),
        ("b", "block", "amount > 2.0"),
    ]


@pytest.mark.parametrize(
    "name", ["rules.yaml", "rewards.yaml", "features.yaml", "learning.yaml", "mapping.yaml"]
)
def test_a_config_file_that_never_ends_is_refused_not_read_for_ever(tmp_path: Path, name: str) -> None:
    """A configuration or mapping path that is /dev/zero (a symlink gone wrong, a fuzzer's argument) or a
    file of gigabytes: it was read whole -- `serve`, `train` and `rules backtest` hung, filling memory.
    Now at most 16 MB are read, and more is refused in one line naming the file."""
    from decision_platform.core.rewards import RewardTable
    from decision_platform.data.csv_import import ColumnMapping, DatasetError
    from decision_platform.features import FeatureSpec
    from decision_platform.learning.config import LearningConfig

    path = tmp_path / name
    path.symlink_to("/dev/zero")
    if name == "mapping.yaml":
        with pytest.raises(DatasetError, match="larger than 16 MB"):
            ColumnMapping.from_yaml(path)
        return
    loaders: dict[str, Callable[[Path], object]] = {
        "rules.yaml": lambda p: RuleSet.load(p, ["amount"]),
        "rewards.yaml": RewardTable.load,
        "features.yaml": FeatureSpec.load,
        "learning.yaml": LearningConfig.load,
    }
    with pytest.raises(ConfigError, match=f"{name}: larger than 16 MB"):
        load_config_file(path, loaders[name])


def test_rules_backtest_of_a_file_that_never_ends_is_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from decision_platform.cli import main as cli

    result = CliRunner().invoke(cli.app, ["rules", "backtest", "/dev/zero"])
    assert result.exit_code == 2, result.output
    assert "larger than 16 MB" in " ".join(result.output.replace("\u2502", " ").split())


def test_a_server_whose_rules_file_never_ends_stops_with_one_line(tmp_path: Path) -> None:
    """`serve` / `worker` read rules.yaml as text for the rules' metrics: with /dev/zero there it hung."""
    import shutil

    from decision_platform.config import PROJECT_ROOT
    from decision_platform.serving.platform import read_config_files

    for name in ("features.yaml", "rewards.yaml"):
        shutil.copy(PROJECT_ROOT / "config" / name, tmp_path / name)
    (tmp_path / "rules.yaml").symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match=r"rules\.yaml: larger than 16 MB"):
        read_config_files(Settings(config_dir=tmp_path))
