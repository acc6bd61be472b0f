"""Dependencies between Tandem's packages point one way (DESIGN.md, "Packages").

Every import is counted, at module level or inside a function, so a lazy import cannot
hide a cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import tandem

ROOT = Path(tandem.__file__).parent

#: What each package may import of ours. A package missing here may import nothing of ours.
ALLOWED = {
    "protocol": set(),
    "runtime": {"protocol"},
    "kvbm": {"protocol"},
    "engine": {"protocol", "kvbm"},
    "transfer": {"protocol"},
    "http": {"runtime"},  # the process's heap (runtime.heap)
    "worker": {"protocol", "runtime", "transfer", "engine"},
    "router": {"protocol", "runtime", "http"},
    "frontend": {"protocol", "runtime", "transfer", "router", "http"},
    "bench": {"protocol", "runtime"},
    "planner": {"protocol", "runtime"},
    "deploy": {"protocol", "runtime", "transfer", "worker", "router", "frontend", "engine",
               "http", "planner"},
    "cli": {"protocol", "runtime", "transfer", "engine", "worker", "router", "frontend",
            "http", "deploy", "bench", "planner"},
}


def package_imports() -> dict[str, set[tuple[str, str]]]:
    """package -> {(imported package, importing file)} over every import statement."""
    found: dict[str, set[tuple[str, str]]] = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if len(parts) == 1:
            continue
        src = parts[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                names = []
            for name in names:
                head = name.split(".")
                if head[0] == "tandem" and len(head) > 1 and head[1] != src:
                    found.setdefault(src, set()).add((head[1], str(path.relative_to(ROOT))))
    return found


def test_every_package_imports_only_what_it_may() -> None:
    found = package_imports()
    assert set(found) <= set(ALLOWED), f"packages missing from ALLOWED: {set(found) - set(ALLOWED)}"
    bad = sorted(
        f"{file} imports tandem.{dst}"
        for src, edges in found.items()
        for dst, file in edges
        if dst not in ALLOWED[src]
    )
    assert not bad, "\n".join(bad)


def test_allowed_graph_has_no_cycles() -> None:
    """The rule table itself is a DAG, so following it cannot build a cycle."""
    state: dict[str, str] = {}

    def visit(pkg: str, path: tuple[str, ...]) -> None:
        assert state.get(pkg) != "open", f"cycle: {' -> '.join((*path, pkg))}"
        if state.get(pkg) == "done":
            return
        state[pkg] = "open"
        for dep in ALLOWED.get(pkg, ()):
            visit(dep, (*path, pkg))
        state[pkg] = "done"

    for pkg in ALLOWED:
        visit(pkg, ())


def test_the_check_sees_a_forbidden_import(tmp_path, monkeypatch) -> None:
    """The scan really reads imports: a planted engine -> runtime import is reported."""
    fake = tmp_path / "tandem"
    (fake / "engine").mkdir(parents=True)
    (fake / "engine" / "x.py").write_text("def f():\n    from tandem.runtime import y\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    assert package_imports() == {"engine": {("runtime", "engine/x.py")}}
