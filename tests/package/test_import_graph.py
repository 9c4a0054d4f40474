"""The import graph of moejax and kernels_pallas, read from the source with `ast`: no cycles,
every package on a floor (docs/architecture.md), and imports only go down: the math packages
never import the config, the models or the drivers built on them.

Every `import` and `from ... import` counts, module-level or inside a function: a lazy import
hides a cycle from the interpreter, not from a reader. Cycles are looked for twice: between
modules, and between packages (`moejax.training`, `moejax.config`, ...; a top-level module such
as `moejax.evaluation` is its own package here), since two packages that import each other
cannot be read or tested one below the other even when no single module cycle closes.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterable

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOP_PACKAGES = ("moejax", "kernels_pallas")

# Edges (importer unit, imported unit) that are still there and are being removed under
# issue 15; each is a package-level edge, see `unit`.
KNOWN_EDGES: set[tuple[str, str]] = set()

# Every package on a floor, lowest first: a module imports only from floors below its own (and
# from its own package). A package that is on no floor fails `test_every_package_is_on_a_floor`,
# so a new one is placed on purpose. The math (routers, moe, sparse attention, pruning,
# quantization, depth) sits below the config, the models and the drivers built on them.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("kernels_pallas", "moejax.errors", "moejax.stats", "moejax.plotting", "moejax.data"),
    ("moejax.parallel", "moejax.rotary", "moejax.norms"),
    ("moejax.routers", "moejax.pruning", "moejax.quantization", "moejax.depth", "moejax.attention"),
    ("moejax.moe", "moejax.metrics", "moejax.sparse_attention", "moejax.latent_attention"),
    ("moejax.config",),
    ("moejax.cli", "moejax.models"),
    ("moejax.pretrained",),
    ("moejax.training", "moejax.tasks", "moejax.sampling", "moejax.generation"),
    ("moejax.evaluation", "moejax.compress", "moejax.rewiring"),
    ("moejax",),
)


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for top in TOP_PACKAGES:
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: Iterable[str]) -> str | None:
    """The module of `modules` that importing `name` loads (the longest known prefix), if any."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(
    module: str, source: str, is_package: bool, modules: Iterable[str] | None = None
) -> set[str]:
    """The moejax and kernels_pallas modules that `source` (the text of `module`) imports;
    `modules`: the modules there are (default: those in the tree now)."""
    modules = set(_modules() if modules is None else modules)
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            # `from a import b` loads `a.b` when b is a module, else only `a`.
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(resolved for name in names if (resolved := _resolve(name, modules)))
    found.discard(module)
    return found


def module_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports, read from the tree as it is now."""
    modules = _modules()
    return {
        module: imports_of(module, path.read_text(), path.name == "__init__.py", modules)
        for module, path in modules.items()
    }


def unit(module: str) -> str:
    """The package a module belongs to for layering: `moejax.training.loop` ->
    `moejax.training`; a top-level module (`moejax.evaluation`) is its own unit; the kernels
    are one unit."""
    parts = module.split(".")
    return parts[0] if parts[0] == "kernels_pallas" else ".".join(parts[:2])


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for module, imported in graph.items():
        edges = units.setdefault(unit(module), set())
        edges.update(unit(other) for other in imported if unit(other) != unit(module))
    return units


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes (first == last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for other in sorted(graph.get(node, ())):
            if state.get(other) == "open":
                return [*stack[stack.index(other) :], other]
            if other not in state and (cycle := visit(other)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_imports_of_reads_lazy_relative_and_from_imports():
    source = (
        "from moejax.training import loop\n"
        "def f():\n"
        "    from . import checkpoint\n"
        "    import moejax.metrics\n"
    )
    found = imports_of("moejax.training.evaluate", source, is_package=False)
    assert found >= {"moejax.training.loop", "moejax.training.checkpoint", "moejax.metrics"}


def test_no_module_imports_itself_back():
    cycle = find_cycle(module_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_package_imports_itself_back():
    units = unit_graph(module_graph())
    for importer, imported in KNOWN_EDGES:
        units[importer].discard(imported)
    cycle = find_cycle(units)
    assert cycle is None, "package import cycle: " + " -> ".join(cycle)


def floor_of(unit_name: str) -> int | None:
    return next((i for i, units in enumerate(FLOORS) if unit_name in units), None)


def test_every_package_is_on_a_floor():
    units = unit_graph(module_graph())
    unplaced = sorted(name for name in units if floor_of(name) is None)
    assert not unplaced, f"place these packages on a floor of FLOORS: {unplaced}"


def test_imports_only_go_down():
    upward = sorted(
        (importer, imported)
        for importer, targets in unit_graph(module_graph()).items()
        for imported in targets
        if floor_of(imported) is not None
        and floor_of(importer) is not None
        and floor_of(imported) >= floor_of(importer)
    )
    assert not upward, f"imports that do not go down a floor: {upward}"


def test_known_exceptions_are_still_needed():
    units = unit_graph(module_graph())
    stale = sorted(edge for edge in KNOWN_EDGES if edge[1] not in units.get(edge[0], ()))
    assert not stale, f"remove these from KNOWN_EDGES, the imports are gone: {stale}"


def test_evaluation_of_runs_sits_above_training():
    units = unit_graph(module_graph())
    assert "moejax.training" in units["moejax.evaluation"]
    assert "moejax.evaluation" not in units["moejax.training"]
