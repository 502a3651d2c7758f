"""The shape of the code: the import graph has no cycle, and the engine knows the samplers only through the
contract (`depthwave.engine.policy`), never by importing them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "depthwave"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """The depthwave modules a file imports when it runs: at module level or inside functions, but not under
    `if TYPE_CHECKING:` (annotations only)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("depthwave"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("depthwave"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    return {name: {m for m in runtime_imports(path) if m in modules and m != name} for name, path in modules.items()}


def top_level_graph() -> dict[str, set[str]]:
    """Only the imports made when a module is imported (module level, not inside functions)."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        edges: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("depthwave"):
                edges.add(node.module)
                edges.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("depthwave"))
        graph[name] = {m for m in edges if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_module_level_import_graph_has_no_cycle() -> None:
    # A package's __init__ re-exporting its own modules is not a cycle of design; edges into a package's own
    # __init__ from its modules would be.
    graph = top_level_graph()
    assert find_cycle(graph) is None, find_cycle(graph)


def test_the_engine_imports_nothing_from_the_samplers() -> None:
    graph = import_graph()
    engine = {name: deps for name, deps in graph.items() if name.startswith("depthwave.engine")}
    assert engine
    offending = {name: sorted(d for d in deps if d.startswith("depthwave.samplers")) for name, deps in engine.items()}
    assert not any(offending.values()), offending


def test_in_a_fresh_interpreter_the_engine_loads_without_the_samplers() -> None:
    code = (
        "import sys, depthwave.engine, depthwave.engine.engine, depthwave.engine.policy; "
        "loaded = [m for m in sys.modules if m.startswith('depthwave.samplers')]; "
        "assert not loaded, loaded"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_quirk_flag_is_read_where_it_acts_and_never_in_the_default_diffusion_policy() -> None:
    from dataclasses import fields

    from depthwave.samplers.quirks import DiffusionQuirks, SpeculativeQuirks

    sources = {p: p.read_text() for p in (SRC / "samplers").rglob("*.py") if p.name != "quirks.py"}
    for cls in (DiffusionQuirks, SpeculativeQuirks):
        for flag in fields(cls):
            readers = [p.name for p, text in sources.items() if f"quirks.{flag.name}" in text]
            assert readers, f"{cls.__name__}.{flag.name} is declared but never read"
    default_path = (SRC / "samplers" / "diffusion" / "policy.py").read_text()
    assert "quirks" not in default_path.replace("depthwave.samplers.quirks", "")


def test_freeze_is_pure() -> None:
    import dataclasses

    from depthwave.samplers.diffusion import FreezeRules, Measured, Window, freeze

    window = Window(start=10, size=3, frozen=11, length=14)
    rules = FreezeRules("latent-diff", headway=1, warmup=8, max_recurrences=None)
    measured = Measured(latent=2, stable=0, capped=0, compared_from=10)
    first = freeze(window, 4, 1, measured, 3, rules)
    again = freeze(window, 4, 1, measured, 3, rules)
    assert first == again and window == Window(10, 3, 11, 14)  # the input is untouched (and frozen)
    assert first.froze and first.window == Window(11, 3, 12, 14) and first.keep == 11
    nothing = freeze(window, 4, 1, Measured(0, 0, 0, 10), 3, rules)
    assert not nothing.froze and nothing.window == dataclasses.replace(window, size=4) and nothing.keep == 10


@pytest.mark.slow
def test_the_type_checker_finds_nothing_in_src() -> None:
    """mypy (pinned in `dev`, configured in pyproject.toml) over src/: no errors, and every `type: ignore` names
    its error code (mypy's ignore-without-code check)."""
    root = SRC.parents[1]
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Success: no issues found" in done.stdout
