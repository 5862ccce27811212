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
    {"train", "export", "baselines", "compare", "integrations", "demo"},
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
