"""Imports point one way: each package imports only what sits below it.

``errors``/``tokens`` at the bottom; the library (``store``, ``history``, ``timing``, ...)
above them; ``providers``; the edges (``chat``, ``server``, ``cli``) on top; ``localapi``
standing alone as an upstream. The table below states, per package (or module), what
it must not import, or the only labkit modules it may import. Every ``import`` in the
source counts, including those inside functions and ``TYPE_CHECKING`` blocks.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Rule:
    #: Modules that must not be imported (a name covers its submodules).
    forbid: frozenset[str] = frozenset()
    #: If set, the only ``labkit`` modules that may be imported (with their submodules).
    only_labkit: frozenset[str] | None = None


#: Storage knows only storage: no models, no terminals, no benchmarks, no drivers.
STORE_FORBIDS = frozenset({
    "labkit.providers", "labkit.history", "labkit.timing", "labkit.server", "labkit.chat",
    "labkit.cli", "labkit.bench", "labkit.services", "labkit.localapi", "labkit.retention",
    "labkit.widgets", "labkit.labs", "rich", "tqdm",
})  # fmt: skip

LAYERS: dict[str, Rule] = {
    "labkit/store": Rule(forbid=STORE_FORBIDS),
    "labkit/localapi": Rule(only_labkit=frozenset({"labkit.errors", "labkit.tokens", "labkit.localapi"})),
    "labkit/errors.py": Rule(only_labkit=frozenset({"labkit.errors"})),
    "labkit/tokens.py": Rule(only_labkit=frozenset({"labkit.errors", "labkit.tokens"})),
    # Checkers run the learner's code against the local API and SQLite; never the edges.
    "labkit/exercises": Rule(forbid=frozenset({
        "labkit.providers", "labkit.server", "labkit.chat", "labkit.cli", "labkit.bench",
        "labkit.services", "labkit.widgets", "labkit.labs",
    })),
}  # fmt: skip


def module_name(path: Path) -> str:
    """``labkit/store/sqlite.py`` → ``labkit.store.sqlite``; a package's ``__init__`` → the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, *, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``source``, relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            if node.module is None:  # from .. import x: x may be a module
                found += [(node.lineno, f"{prefix}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, prefix))
    return found


def _covered(name: str, modules: frozenset[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def violations(target: str, rule: Rule) -> list[str]:
    path = ROOT / target
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    assert files, f"{target} holds no Python files"
    bad = []
    for file in files:
        module = module_name(file)
        for line, name in imports_of(
            file.read_text(), module, is_package=file.name == "__init__.py"
        ):
            if _covered(name, rule.forbid):
                bad.append(f"{file.relative_to(ROOT)}:{line} imports {name}")
            elif (
                rule.only_labkit is not None
                and _covered(name, frozenset({"labkit"}))
                and not _covered(name, rule.only_labkit)
            ):
                bad.append(f"{file.relative_to(ROOT)}:{line} imports {name} (only {sorted(rule.only_labkit)})")  # fmt: skip
    return bad


@pytest.mark.parametrize("target", sorted(LAYERS))
def test_package_imports_only_what_its_layer_allows(target):
    assert violations(target, LAYERS[target]) == []


def test_the_import_walker_sees_relative_lazy_and_package_imports():
    source = (
        "from __future__ import annotations\n"
        "import rich.console\n"
        "from . import base\n"
        "from .base import SessionStore\n"
        "def f():\n"
        "    from ..providers import client\n"
        "    from .. import history\n"
    )
    got = [name for _, name in imports_of(source, "labkit.store.sqlite")]
    assert got == [
        "__future__", "rich.console", "labkit.store.base", "labkit.store.base",
        "labkit.providers", "labkit.history",
    ]  # fmt: skip
    assert [n for _, n in imports_of("from .base import X", "labkit.store", is_package=True)] == [
        "labkit.store.base"
    ]


def test_a_forbidden_import_is_reported_with_its_line(tmp_path, monkeypatch):
    pkg = tmp_path / "labkit" / "store"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .base import X\n")
    (pkg / "bad.py").write_text("import os\n\ndef f():\n    from ..history import Turn\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert violations("labkit/store", LAYERS["labkit/store"]) == [
        "labkit/store/bad.py:4 imports labkit.history"
    ]
    (pkg / "bad.py").write_text("from ..errors import StoreError\nfrom ..store import base\n")
    rule = Rule(only_labkit=frozenset({"labkit.errors"}))
    assert violations("labkit/store", rule) == [
        "labkit/store/__init__.py:1 imports labkit.store.base (only ['labkit.errors'])",
        "labkit/store/bad.py:2 imports labkit.store (only ['labkit.errors'])",
    ]
