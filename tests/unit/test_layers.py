"""The house stays layered: a module imports only its own floor (package) and the floors below it.

The floors, bottom to top, are README's "Architecture"; this list is the contract. An import that goes up
a floor fails here with the file, the line and the two floors, so the fix is obvious: move the code down,
or pass it in from above.
"""

from __future__ import annotations

import ast
from pathlib import Path

from decision_platform.config import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "src" / "decision_platform"

#: Bottom to top. ``config`` is the module config.py.
FLOORS = (
    "core",
    "config",
    "observability",
    "devtools",
    "storage",
    "events",
    "features",
    "rules",
    "data",
    "models",
    "explain",
    "serving",
    "training",
    "learning",
    "reporting",
    "console",
    "api",
    "cli",
)


def floor_of(module: str) -> str:
    """``decision_platform.models.risk`` -> ``models``."""
    return module.split(".")[1]


def imports(path: Path) -> list[tuple[int, str]]:
    """Every project module ``path`` imports (top-level and inside functions), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("decision_platform."):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("decision_platform.")]
    return found


def test_every_package_is_a_floor() -> None:
    packages = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if not p.name.startswith("_")}
    packages.discard("__pycache__")
    assert packages == set(FLOORS), "add the new package to FLOORS (and to README's architecture)"


def test_imports_only_go_down() -> None:
    rank = {floor: i for i, floor in enumerate(FLOORS)}
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        own = relative.parts[0].removesuffix(".py")
        for line, module in imports(path):
            target = floor_of(module)
            if rank[target] > rank[own]:
                upward.append(f"{relative}:{line} ({own}) imports {module} ({target}, a floor above)")
    assert not upward, "\n".join(upward)


def test_core_imports_nothing_of_the_project_but_itself() -> None:
    for path in (PACKAGE / "core").rglob("*.py"):
        assert all(floor_of(m) == "core" for _, m in imports(path)), path
