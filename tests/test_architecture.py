"""The package's shape, checked by walking its imports (ARCHITECTURE.md, "Import rules").

Every rule here is one a newcomer relies on to find their way: imports point down the layers,
`core` stays free of files and torch, no module reaches into another's private names, and no
function grows past what one screen shows.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nuclei_app"

#: Layers from the ground up: a module may import from its own layer's package and from lower layers.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "config", "provenance", "progress", "atomic", "schemas", "seeding", "__init__"),
    ("core",),
    ("io", "model"),
    ("bids",),
    ("train", "segment", "evaluate", "sample_data"),
    ("qc",),
    ("workflows",),
    ("bids_app",),
    ("demo",),
    ("cli",),
    ("__main__",),
)
#: Siblings in one layer that must not import each other (they share what lies below them).
INDEPENDENT_SIBLINGS = {("train", "segment"), ("segment", "train"), ("io", "model"), ("model", "io")}
#: Third-party packages that only `io` may touch (formats) and that `core` may not import.
FORMAT_LIBRARIES = ("tifffile", "zarr", "ome_zarr")
MAX_FUNCTION_LINES = 100


def _top(module: str) -> str:
    """``nuclei_app.io.slides`` -> ``io``; ``nuclei_app.cli`` -> ``cli``."""
    return module.split(".")[1] if module.count(".") else "__init__"


def _layer(top: str) -> int:
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"nuclei_app.{top} is in no layer of tests/test_architecture.py; add it to LAYERS")


def _modules() -> list[tuple[str, Path, ast.Module]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found.append((name, path, ast.parse(path.read_text(encoding="utf-8"))))
    return found


def _imports(tree: ast.Module) -> list[tuple[ast.ImportFrom | ast.Import, str, list[str], bool]]:
    """(node, imported module, imported names, deferred inside a function) for every import."""
    deferred = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            deferred.update(id(sub) for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom)))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node, node.module, [a.name for a in node.names], id(node) in deferred))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                found.append((node, alias.name, [], id(node) in deferred))
    return found


MODULES = _modules()


def _internal_edges() -> list[tuple[str, str, int, bool]]:
    edges = []
    for name, _, tree in MODULES:
        for node, target, names, deferred in _imports(tree):
            if target == "nuclei_app" and names:  # `from nuclei_app import __version__`
                targets = [f"nuclei_app.{n}" if n != "__version__" else "nuclei_app" for n in names]
            elif target.startswith("nuclei_app"):
                targets = [target]
            else:
                continue
            edges.extend((name, t, node.lineno, deferred) for t in targets)
    return edges


def test_every_module_sits_in_a_layer():
    for name, _, _ in MODULES:
        _layer(_top(name))


def test_imports_point_down_the_layers_and_independent_siblings_stay_apart():
    broken = []
    for source, target, line, _ in _internal_edges():
        low, high = _top(target), _top(source)
        if low == high:
            continue
        if _layer(low) > _layer(high) or (_layer(low) == _layer(high) and (high, low) in INDEPENDENT_SIBLINGS):
            broken.append(f"{source}:{line} imports {target}")
        elif _layer(low) == _layer(high) and _layer(low) != 0:
            broken.append(f"{source}:{line} imports its sibling {target}")
    assert not broken, "imports against the layers:\n" + "\n".join(broken)


def test_there_is_no_import_cycle_between_modules():
    graph: dict[str, set[str]] = {}
    for source, target, _, deferred in _internal_edges():
        if not deferred and source != target:
            graph.setdefault(source, set()).add(target)
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_core_opens_no_files_and_imports_no_torch_or_format_library():
    broken = []
    for name, _, tree in MODULES:
        if _top(name) != "core":
            continue
        for node, target, _, _ in _imports(tree):
            if target.split(".")[0] in ("torch", "torchvision", *FORMAT_LIBRARIES):
                broken.append(f"{name}:{node.lineno} imports {target}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
                broken.append(f"{name}:{node.lineno} calls open()")
    assert not broken, "\n".join(broken)


def test_only_io_touches_image_and_label_formats_and_only_checkpoint_saves_weights():
    broken = []
    for name, _, tree in MODULES:
        top = _top(name)
        for node, target, names, _ in _imports(tree):
            if target.split(".")[0] in FORMAT_LIBRARIES and top != "io":
                broken.append(f"{name}:{node.lineno} imports {target}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("save", "load")
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and name != "nuclei_app.model.checkpoint"):
                broken.append(f"{name}:{node.lineno} calls torch.{node.func.attr}")
    assert not broken, "\n".join(broken)


def test_no_module_imports_another_modules_private_names():
    broken = [
        f"{source}:{node.lineno} imports {', '.join(n for n in names if n.startswith('_') and not n.startswith('__'))}"
        f" from {target}"
        for source, _, tree in MODULES
        for node, target, names, _ in _imports(tree)
        if target.startswith("nuclei_app") and any(n.startswith("_") and not n.startswith("__") for n in names)
    ]
    assert not broken, "\n".join(broken)


def test_package_imports_are_at_the_top_except_those_that_pull_torch():
    """Deferred imports hide the real graph; only the torch-heavy layers (model, train) may be
    imported inside a function, so that the CLI, QC and the weak labeler start without torch."""
    broken = [
        f"{source}:{line} imports {target} inside a function"
        for source, target, line, deferred in _internal_edges()
        if deferred and not target.startswith(("nuclei_app.model", "nuclei_app.train"))
    ]
    assert not broken, "\n".join(broken)


def test_no_function_is_longer_than_a_screenful_or_two():
    long = []
    for name, _, tree in MODULES:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


@pytest.mark.parametrize("rule", ["layers", "private"])
def test_the_checks_catch_a_broken_rule(rule, monkeypatch):
    """The walker is not vacuous: a planted violation is reported."""
    planted = {
        "layers": "from nuclei_app.cli import main\n",
        "private": "from nuclei_app.io.slides import _first_line\n",
    }[rule]
    monkeypatch.setattr(__import__(__name__), "MODULES",
                        MODULES + [("nuclei_app.core.planted", PACKAGE / "core" / "planted.py", ast.parse(planted))])
    check = {
        "layers": test_imports_point_down_the_layers_and_independent_siblings_stay_apart,
        "private": test_no_module_imports_another_modules_private_names,
    }[rule]
    with pytest.raises(AssertionError):
        check()
