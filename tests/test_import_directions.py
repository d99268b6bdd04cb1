"""Parses every module's imports and enforces the import directions of DESIGN.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("strategies", "client", "server", "simulations", "tasks")

# package prefix -> top-level names it must never import
FORBIDDEN: dict[str, set[str]] = {
    "strategies": {"client", "server", "simulations", "tasks"},
    "strategies.sparse": {"flwr", "client", "server", "simulations", "tasks"},
    "strategies.continual": {"flwr", "client", "server", "simulations", "tasks"},
    "strategies.secure": {"flwr", "client", "server", "simulations", "tasks"},
    "tasks": {"client", "server", "simulations"},
    "client": {"server", "simulations"},
    "server": {"client", "simulations"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imported_names(tree: ast.AST, module: str) -> set[str]:
    """Absolute dotted names imported by a module (relative imports resolved)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level] if node.level else []
                prefix = ".".join(base + ([node.module] if node.module else []))
                names.add(prefix)
            elif node.module:
                names.add(node.module)
    return names


def _all_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_there_are_modules_to_check() -> None:
    # Guards against the check silently passing on an empty or moved tree.
    assert len(_all_modules()) >= len(PACKAGES)


@pytest.mark.parametrize("path", _all_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_import_directions(path: Path) -> None:
    module = _module_name(path)
    imported = _imported_names(ast.parse(path.read_text()), module)
    for prefix, forbidden in FORBIDDEN.items():
        if module == prefix or module.startswith(prefix + "."):
            bad = sorted(n for n in imported if n.split(".")[0] in forbidden)
            assert not bad, f"{module} must not import {bad} (DESIGN.md import directions)"


def test_checker_catches_a_violation() -> None:
    # The rule itself must bite: a sparse module importing flwr is flagged.
    tree = ast.parse("import flwr\nfrom client import app\n")
    names = _imported_names(tree, "strategies.sparse.masks")
    assert {"flwr", "client"} <= names


@pytest.mark.parametrize("path", _all_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_opens_with_a_docstring(path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{path.relative_to(ROOT)} needs a one-line docstring saying its job"
