"""The package's layers (README "Layers"): every import, at module level or inside a function,
goes down the table or stays inside its own unit, and no modules import each other in a circle."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "varedit_deploy"
# Lowest first. A unit is a top-level module or a subpackage; a unit may import any unit of a lower
# layer, and a unit of its own layer only where the layer says so (the shared base and contracts).
LAYERS: list[tuple[str, tuple[str, ...], bool]] = [  # (layer, units, units of the layer may import each other)
    ("base", ("__init__", "errors", "timings", "fileio", "config", "precisions", "imaging", "sampling",
              "fixtures", "graph_io"), True),
    ("contracts", ("containment", "artifact", "engine_set"), True),
    ("math", ("model",), False),
    ("kernels", ("plugins",), False),
    ("runtime", ("runtime",), False),
    ("export", ("export",), False),
    ("products", ("builder", "calibration", "serve"), False),
    ("tools", ("inspection", "memory_plan", "parity", "demo"), False),
    ("cli", ("cli",), False),
]
RANK = {unit: rank for rank, (_, units, _) in enumerate(LAYERS) for unit in units}
SHARED = {rank for rank, (_, _, shared) in enumerate(LAYERS) if shared}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every varedit_deploy module `path` imports, wherever the import statement stands."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("varedit_deploy"):
                # `from . import x` and `from .pkg import mod` may name modules: keep those that exist
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").is_file()
                              or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("varedit_deploy"))
    return found - {name}


GRAPH = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_unit_has_a_layer():
    assert {unit(m) for m in GRAPH} <= set(RANK), sorted({unit(m) for m in GRAPH} - set(RANK))


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_the_layers(module):
    here = unit(module)
    wrong = []
    for target in sorted(GRAPH[module]):
        there = unit(target)
        if there == here:
            continue
        if RANK[there] > RANK[here] or (RANK[there] == RANK[here] and RANK[here] not in SHARED):
            wrong.append(f"{target} ({LAYERS[RANK[there]][0]})")
    assert not wrong, f"{module} ({LAYERS[RANK[here]][0]}) imports upward or sideways: {', '.join(wrong)}"


def test_no_modules_import_each_other_in_a_circle():
    """Tarjan's strongly connected components over every import; each must be a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert not circles, f"import circles: {circles}"


def test_the_oracle_sees_an_upward_import(tmp_path):
    """The checker itself: a model module importing the runtime is caught."""
    fake = PACKAGE / "model" / "codes.py"
    assert "varedit_deploy.runtime.loop" not in GRAPH["varedit_deploy.model.codes"]
    planted = tmp_path / "varedit_deploy" / "model" / "codes.py"
    planted.parent.mkdir(parents=True)
    planted.write_text(fake.read_text() + "\nfrom ..runtime.loop import ScaleLoop\n")
    assert "varedit_deploy.runtime.loop" in {m for m in _imports_as(planted, tmp_path)}


def _imports_as(path: Path, root: Path) -> set[str]:
    global PACKAGE
    saved, PACKAGE = PACKAGE, root / "varedit_deploy"
    try:
        return imports(path)
    finally:
        PACKAGE = saved
