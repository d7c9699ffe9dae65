"""The package's rooms (DESIGN.md "Rooms"), checked on its source: who may import whom."""

from __future__ import annotations

import ast
import pathlib

import pytest

import fastvec

PACKAGE = pathlib.Path(fastvec.__file__).parent


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports, absolute (``from . import x`` resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(("fastvec", *path.relative_to(PACKAGE).parent.parts))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


SOURCES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_the_sources_are_found() -> None:
    assert {"layout.py", "worker.py", "_pool.py", "vector_env.py"} <= {p.name for p in SOURCES}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_layout_calls_the_kernels(path: pathlib.Path) -> None:
    if path == PACKAGE / "layout.py":
        return
    assert "fastvec._kernels" not in imported_modules(path)


FACE = {"fastvec.vector_env", "fastvec._partial", "fastvec._partial_calls",
        "fastvec._env_calls"}


@pytest.mark.parametrize("name", ["_pool.py", "worker.py", "_worker_main.py", "_processes.py",
                                  "_launch.py", "_deaths.py", "_local.py", "_segment.py",
                                  "layout.py", "_load.py", "_placement.py", "_waiting.py",
                                  "_machine.py"])
def test_the_engine_does_not_import_the_face(name: str) -> None:
    assert not imported_modules(PACKAGE / name) & FACE


def test_the_relative_imports_are_resolved() -> None:
    # the check above would pass on a module whose imports were all missed
    assert "fastvec._kernels" in imported_modules(PACKAGE / "layout.py")
    assert "fastvec._pool" in imported_modules(PACKAGE / "vector_env.py")
