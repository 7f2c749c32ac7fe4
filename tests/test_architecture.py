"""The layout's rules (docs/architecture.md), read from the source: imports go one way between layers and never in a
circle, no file is over 400 lines and no function over 80."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tmtseg"

# lowest first: a module may import its own layer and the layers below, never one above
LAYERS = [
    (
        "tmtseg.errors",
        "tmtseg.registry",
        "tmtseg.settings",
        "tmtseg.dist",
        "tmtseg.metrics",
        "tmtseg.hashing",
    ),  # foundations
    # files: checkpoints, locks, pictures, whole files (written beside and renamed)
    ("tmtseg.io.checkpoint", "tmtseg.io.runlock", "tmtseg.io.pictures", "tmtseg.io.files"),
    ("tmtseg.modeling", "tmtseg.losses"),  # the segmenter (with its backbones' pretrained weights) and its losses
    ("tmtseg.adapt",),  # the adaptation pieces and their tables
    ("tmtseg.config",),  # the typed config: validated against the tables below it
    ("tmtseg.data",),  # datasets built from the config
    ("tmtseg.engine",),  # training, its logs, and evaluation
    ("tmtseg.tools",),  # bench, diagnose, export, predict, viz, demo
    ("tmtseg.cli", "tmtseg.api", "tmtseg.__main__"),  # the faces a user calls
]


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    assert best is not None, f"{module}: in no layer of tests/test_architecture.py"
    return best[0]


def _runtime_imports(path: Path) -> set[str]:
    """Modules of the package that `path` imports at run time (at the top or inside a function; not the imports under
    `if TYPE_CHECKING:`, which only name types)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tmtseg"):
            for alias in node.names:  # `from tmtseg.x import y` may name the module tmtseg.x.y
                sub = f"{node.module}.{alias.name}"
                out.add(sub if _is_module(sub) else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("tmtseg"))
    return out


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    files = [p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"]  # the package's face names no module
    return {_module(p): {m for m in _runtime_imports(p) if m != "tmtseg"} for p in files}


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
        for m, deps in sorted(_graph().items())
        for d in sorted(deps)
        if _layer(d) > _layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if d.startswith(m + "."):  # a package importing its own submodules is how a package re-exports
                continue
            if state.get(d) == 1:
                cycles.append(" -> ".join([*path[path.index(d) :], d]))
            elif d in graph and d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The walk itself: a low module that imports a tool is caught (so the test above can fail)."""
    fake = tmp_path / "low.py"
    fake.write_text("from tmtseg.tools.bench import run_bench\n\ndef f():\n    import tmtseg.cli\n")
    imports = _runtime_imports(fake)
    assert {"tmtseg.tools.bench", "tmtseg.cli"} <= imports
    assert max(_layer(m) for m in imports) > _layer("tmtseg.modeling.layers")
    guarded = tmp_path / "typed.py"
    guarded.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tmtseg.config import Config\n")
    assert _runtime_imports(guarded) == set()


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_and_functions_stay_short(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= 400, f"{path}: {len(lines)} lines (at most 400: split it by idea)"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse("\n".join(lines)))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, f"{path}: functions over 80 lines: {long}"
