"""The layering the README's Architecture section states holds in the code: no module imports a layer below it.

Every ``import`` and ``from ... import`` of every module under src/zotune is read (function-level ones
too: a lazy import is still a dependency), each module mapped to its layer, and an import of a later
layer of the list is a failure naming both files.
"""

import ast
from pathlib import Path

SRC = Path(__file__).parent.parent / "src" / "zotune"

# The README's table, in order: a module may import its own layer and the layers before it.
LAYERS = [
    {"errors", "version"},
    {"rng"},
    {"checkpoint", "runtime", "plot"},
    {"kernels"},
    {"optim", "trajectory", "distributed"},
    {"models", "tuning", "prefix", "memory"},
    {"config"},
    {"tasks", "objectives"},
    {"train", "start", "export", "baselines", "compare", "integrations", "demo"},
    {"cli"},
]


def _layer(top: str) -> int:
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"zotune.{top} is in no layer of the README's table: add it there and here")


def _imports(path: Path) -> list[str]:
    """The zotune modules ``path`` imports, as dotted names below zotune ("optim.step", or "" for the package)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name.removeprefix("zotune").lstrip(".") for a in node.names if a.name.split(".")[0] == "zotune"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "zotune":
            module = node.module.removeprefix("zotune").lstrip(".")
            if module:
                out.append(module)
            else:  # `from zotune import x`: a submodule, or a name of the package's __init__ (the package itself)
                out += [
                    a.name if (SRC / a.name).is_dir() or (SRC / f"{a.name}.py").is_file() else "" for a in node.names
                ]
    return out


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue  # the package facade re-exports every layer
        yield rel, path


def test_every_module_imports_only_its_layer_and_those_above():
    bad = []
    for rel, path in _modules():
        own = _layer(rel.parts[0].removesuffix(".py"))
        for name in _imports(path):
            if not name:
                bad.append(f"{rel} imports the package zotune itself (import from the module that defines it)")
                continue
            if _layer(name.split(".")[0]) > own:
                bad.append(f"{rel} imports zotune.{name}, a later layer")
    assert not bad, "\n".join(bad)


def test_the_trajectory_format_imports_nothing_from_the_optimizer():
    assert not [n for n in _imports(SRC / "trajectory.py") if n.startswith("optim")]


def test_nothing_imports_the_cli():
    assert not [str(rel) for rel, path in _modules() if rel.name != "cli.py" and "cli" in _imports(path)]


def _module_of(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _exists(name: str) -> bool:
    base = SRC.joinpath(*name.split(".")) if name else SRC
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _edges(path: Path) -> set[str]:
    """The zotune modules ``path`` depends on: ``from zotune.x import y`` is zotune.x.y where that is a module."""
    out = set()
    tree = ast.parse(path.read_text())
    typing_only = {  # `if TYPE_CHECKING:` imports never run
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
        for n in ast.walk(block)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name.removeprefix("zotune").lstrip(".") for a in node.names if a.name.split(".")[0] == "zotune"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "zotune":
            module = node.module.removeprefix("zotune").lstrip(".")
            for a in node.names:
                sub = f"{module}.{a.name}".lstrip(".")
                out.add(sub if _exists(sub) else module)
    return out


def test_no_import_cycle_between_modules():
    """Module-level and lazy imports alike; a package's __init__ re-exporting its modules is not a cycle."""
    graph = {}
    for path in SRC.rglob("*.py"):
        module = _module_of(path)
        graph[module] = {m for m in _edges(path) if m != module}
    inits = {_module_of(p) for p in SRC.rglob("__init__.py")}
    for module in graph:  # a module's import of its own package's __init__ stands for the names it re-exports
        graph[module] = {m for m in graph[module] if not (m in inits and module.startswith(m + ".") or m == "")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n) :] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state and m not in inits:
            visit(m)
