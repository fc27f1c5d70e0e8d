"""The package's layers (docs/dev/interfaces.md): imports only run downwards.

system < queue < gearman < workers < ops < daemon, cli. A module may import from its own
layer and the ones below, never from a layer above. Read from the source with ``ast``, so
imports inside functions (lazy ones) count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "atomnode"

#: Layer of each top-level part of the package, lowest first.
LAYERS = {
    "atomnode": 0,  # the package itself: only __version__
    "atomnode.system": 0,
    "atomnode.queue": 1,
    "atomnode.gearman": 2,
    "atomnode.workers": 3,
    "atomnode.ops": 4,
    "atomnode.console": 4,  # the web console: operator side, served by the daemon
    "atomnode.daemon": 5,
    "atomnode.cli": 5,
    "atomnode.__main__": 5,
}

#: Modules that must stay free of I/O (sans-I/O: tested with plain calls, fuzzed).
PURE = ("atomnode.gearman.protocol", "atomnode.gearman.broker", "atomnode.queue.commands")
IO_MODULES = {"trio", "sqlite3", "os", "socket", "select", "threading", "time", "subprocess",
              "sqlite_utils", "selectors", "asyncio"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int | None:
    """Layer of an atomnode module (longest matching part), None if not ours or in no
    layer yet (a new folder must be placed in LAYERS)."""
    if module in ("atomnode", "atomnode.__version__"):
        return LAYERS["atomnode"]
    best: tuple[int, int] | None = None
    for prefix, layer in LAYERS.items():
        if prefix != "atomnode" and (module == prefix or module.startswith(prefix + ".")):
            if best is None or len(prefix) > best[0]:
                best = (len(prefix), layer)
    return None if best is None else best[1]


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None or (node.level and not node.module):
                # "from . import x" / "from .. import x": each name may be a module.
                out.extend((node.lineno, f"{target}.{a.name}") for a in node.names)
            else:
                out.append((node.lineno, target))
    return out


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    assert MODULES
    for path in MODULES:
        assert _layer(_module_name(path)) is not None, f"{path}: add its folder to LAYERS"
    assert _layer("atomnode.newpart.x") is None


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_only_run_downwards(path: Path) -> None:
    module = _module_name(path)
    own = _layer(module)
    assert own is not None
    upward = []
    for line, target in _imports(path, module):
        layer = _layer(target)
        if layer is not None and layer > own:
            upward.append(f"{path.name}:{line} imports {target} (layer {layer} > {own})")
    assert not upward, "imports that run upwards:\n" + "\n".join(upward)


@pytest.mark.parametrize("module", PURE)
def test_sans_io_modules_import_no_io(module: str) -> None:
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    found = {t.split(".")[0] for _, t in _imports(path, module)} & IO_MODULES
    assert not found, f"{module} imports {sorted(found)}"


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    # The test above can fail: an upward relative import is found and placed.
    fake = tmp_path / "atomnode" / "system" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from ..ops.client import AdminClient\nfrom . import names\n")
    found = _imports(fake, "atomnode.system.bad")
    assert found == [(1, "atomnode.ops.client"), (2, "atomnode.system.names")]
    assert _layer(found[0][1]) == 4 > _layer("atomnode.system.bad") == 0


#: Private names of other libraries that are the documented way to type a hook.
FOREIGN_PRIVATE_OK = {"argparse._SubParsersAction"}


def _own_private_names(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, and ``self._x`` / ``cls._x``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.AnnAssign,)) and isinstance(node.target, ast.Attribute):
            names.add(node.target.attr)
    for node in ast.walk(tree):  # __slots__ entries
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
        ) and isinstance(node.value, (ast.Tuple, ast.List)):
            names.update(e.value for e in node.value.elts if isinstance(e, ast.Constant))
    return {n for n in names if n.startswith("_")}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_no_module_touches_another_modules_private_names(path: Path) -> None:
    # obj._name is fine only where this module defines _name itself (its own classes'
    # private state); anything else reaches into another module's internals.
    tree = ast.parse(path.read_text(), str(path))
    own = _own_private_names(tree)
    foreign = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__") and node.attr not in own):
            text = ast.unparse(node)
            if text not in FOREIGN_PRIVATE_OK:
                foreign.append(f"{path.name}:{node.lineno} {text}")
    assert not foreign, "private names of other modules:\n" + "\n".join(foreign)
