"""Layers point one way: no import cycle among the runtime's modules (not even for type
hints), and the HTTP API reads a runtime through its own protocol, never `outbound.runtime`."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

from outbound import Config, Runtime
from outbound.api import RuntimeView

RUNTIME_DIR = Path(__file__).resolve().parent.parent / "runtime"  # installed as `outbound`
OTHER_LAYERS = ("outbound.actors", "outbound.destinations", "outbound.benchmarks")


def module_name(path: Path, root: Path) -> str:
    parts = ["outbound", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path, known: set[str]) -> set[str]:
    """Every module of `known` that `path` imports anywhere in it: at the top, under
    `if TYPE_CHECKING:`, or inside a function (a lazy import)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a import b` imports module a.b when there is one, else names of a.
            targets = [f"{base}.{alias.name}" for alias in node.names]
            targets = [target if target in known else base for target in targets]
        else:
            continue
        for target in targets:
            if target.startswith(tuple(f"{layer}." for layer in OTHER_LAYERS) + OTHER_LAYERS):
                continue  # a layer below (or benchmarks): not one of these modules
            while target and target not in known:  # `import a.b.c` of a name inside a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """The runtime side's modules (the files under `root`) and which of them each imports."""
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    known = set(files)
    return {name: imports_of(path, root, known) for name, path in files.items()}


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        return list(error.args[1])
    return None


def test_the_runtime_modules_import_each_other_without_a_cycle() -> None:
    graph = import_graph(RUNTIME_DIR)
    assert {"outbound.runtime", "outbound.handoff", "outbound.api.app"} <= set(graph)
    assert cycle_in(graph) is None, f"import cycle: {' -> '.join(cycle_in(graph) or [])}"
    # The facade's parts take what they need as arguments: they never import it.
    parts = ("handoff", "backpressure", "shutdown", "machinery", "gc_tuning", "lifecycle")
    parts += ("registrations", "wiring", "health", "sql_query", "runs", "signals")
    for part in parts:
        assert "outbound.runtime" not in graph[f"outbound.{part}"], part


def test_the_cycle_check_sees_imports_made_only_for_type_hints(tmp_path: Path) -> None:
    (tmp_path / "facade.py").write_text("from outbound.part import helper\n")
    (tmp_path / "part.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from outbound.facade import Facade\n"
        "def helper(): ...\n"
    )
    assert sorted(cycle_in(import_graph(tmp_path)) or []) == sorted(
        ["outbound.facade", "outbound.part", "outbound.facade"]
    )


def test_the_api_package_imports_nothing_from_the_runtime_facade() -> None:
    graph = import_graph(RUNTIME_DIR)
    api = {name: targets for name, targets in graph.items() if name.startswith("outbound.api")}
    assert len(api) >= 5
    for name, targets in api.items():
        # Not `outbound.runtime`, nor the package face that re-exports its Runtime.
        assert not targets & {"outbound.runtime", "outbound"}, (name, targets)


def test_a_runtime_offers_everything_the_api_reads(data_dir: Path) -> None:
    assert isinstance(Runtime(Config(data_dir=data_dir)), RuntimeView)
