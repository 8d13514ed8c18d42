"""The import graph of src/visto holds the layer order of shared/DESIGN.md: an import goes down
or sideways, never up, and no module reaches itself again through its imports.

Every `import` counts, at the top of a module or inside a function: a deferred import is still
a dependency, only a later one. The graph is read with `ast`, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Low to high. Names in one tuple are one layer: they may import each other, without a cycle.
# tools/ (expert models as tools) is not in DESIGN.md's list: it knows images and JSON, not
# models, and sits beside tasks/. pretrained.py is not in it either: it reads the parts a
# config names (checkpoints included) and builds the model from them, so it sits just above
# checkpoint.py, which builds the models it loads from configs that name no files.
LAYERS = (
    ("errors", "config", "utils", "losses", "device"),
    ("data",),
    ("nn",),
    ("connectors",),
    ("models",),
    ("checkpoint",),
    ("pretrained",),
    ("train", "infer", "index"),
    ("tasks", "tools"),
    ("eval",),
    ("serve",),
    ("quickstart", "compare"),
    ("commands",),
    ("cli",),
)
LAYER = {name: rank for rank, names in enumerate(LAYERS) for name in names}

# (importer, imported) -> why it still stands. Each one is a debt: fix it and delete its line.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module under src/visto (a package is its __init__)."""
    found = {}
    for path in sorted((SRC / "visto").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The visto modules that `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def nearest_module(dotted: str) -> str:
        # `from visto.data import Sample` names the package; `visto.data.tokenizer` a module
        while dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {nearest_module(a.name) for a in node.names if a.name.split(".")[0] == "visto"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "visto":
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else nearest_module(base))
    # Python runs every ancestor package's __init__ before a submodule, so importing one (a
    # package's shared types, e.g. `from visto.eval import EvalResult`) orders nothing new.
    return {m for m in found if m != name and not name.startswith(m + ".")}


def graph() -> dict[str, set[str]]:
    known = modules()
    # The root package only holds __version__ and a lazy `visto.load` (checkpoint.load): an
    # import of it is an import of checkpoint's layer, and it is no importer of its own.
    return {name: imports(name, path, known) for name, path in known.items() if name != "visto"}


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYER["checkpoint"] if len(parts) == 1 else LAYER[parts[1]]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_package_has_a_layer():
    packages = {name.split(".")[1] for name in modules() if "." in name}
    assert packages <= set(LAYER), f"add these to LAYERS: {sorted(packages - set(LAYER))}"


def test_cycles_are_found():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(edges) == [["a", "b", "c"]]


def test_no_upward_import():
    upward = sorted(
        f"{importer} -> {imported}"
        for importer, targets in graph().items()
        for imported in targets
        if layer(imported) > layer(importer) and (importer, imported) not in EXCEPTIONS
    )
    assert not upward, "imports that go up the layer order of DESIGN.md:\n" + "\n".join(upward)


def test_no_cycle():
    edges = {
        importer: {t for t in targets if (importer, t) not in EXCEPTIONS}
        for importer, targets in graph().items()
    }
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_every_exception_is_still_needed():
    edges = graph()
    stale = [f"{a} -> {b}" for a, b in EXCEPTIONS if b not in edges.get(a, set())]
    assert not stale, "these imports are gone; delete their EXCEPTIONS lines:\n" + "\n".join(stale)


MAX_FUNCTION_LINES = 100  # issue 16: a function longer than this is split where it reads best


def test_no_function_over_a_screenful():
    long = []
    for path in sorted((SRC / "visto").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
