"""Packaging: one version, stubs that match the compiled modules, a typed API, a whole wheel.

The wheel test builds a wheel of this checkout (tens of seconds, build requirements fetched
by pip), so it is marked ``packaging`` and left out of the default run; ``.ci/run`` runs it
with ``python -m pytest -m packaging``.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys
import sysconfig
import zipfile

import pytest

import fastvec

ROOT = pathlib.Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
PACKAGE = pathlib.Path(fastvec.__file__).resolve().parent


def _mypy_env() -> dict[str, str]:
    """Where mypy finds fastvec: an installed wheel by itself (PEP 561, py.typed); an
    editable install only through its source tree, as mypy cannot run import hooks."""
    env = dict(os.environ)
    if PACKAGE.parent.name == "src":
        env["MYPYPATH"] = str(PACKAGE.parent)
    return env


def _run(*args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env=_mypy_env(), timeout=timeout)


# -- version -----------------------------------------------------------------------------------

def test_version_is_single_sourced() -> None:
    assert importlib.metadata.version("fastvec") == fastvec.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+([a-z]+\d+)?(\.dev\d+)?", fastvec.__version__)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert 'input = "src/fastvec/_version.py"' in pyproject
    source = (ROOT / "src" / "fastvec" / "_version.py").read_text()
    assert source.strip() == f'__version__ = "{fastvec.__version__}"'


# -- typing ------------------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_stubs_match_the_compiled_modules() -> None:
    proc = _run("-m", "mypy.stubtest", "fastvec._kernels", "fastvec._sync", "--concise",
                "--allowlist", str(TESTS / "stubtest_allowlist.txt"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


# a cold mypy cache reads numpy's and gymnasium's stubs: minutes on a busy 2-core machine
@pytest.mark.timeout(900)
def test_public_api_and_stubs_type_check_with_mypy_strict() -> None:
    # --follow-imports=silent: fastvec's own modules are read for their types, but this
    # test is about what users see (typed_usage.py), not the internals.
    usage = _run("-m", "mypy", "--strict", "--follow-imports=silent",
                 str(TESTS / "typed_usage.py"))
    assert usage.returncode == 0, usage.stdout + usage.stderr
    # by module name, not by path: an installed package's path would make mypy take all
    # of site-packages for a source root
    stubs = _run("-m", "mypy", "--strict", "-m", "fastvec._kernels", "-m", "fastvec._sync")
    assert stubs.returncode == 0, stubs.stdout + stubs.stderr


def test_installed_package_ships_its_typing() -> None:
    assert (PACKAGE / "py.typed").is_file()
    for module in ("_kernels", "_sync"):
        assert (PACKAGE / f"{module}.pyi").is_file()


# -- the wheel ---------------------------------------------------------------------------------

@pytest.mark.packaging
@pytest.mark.timeout(600)
def test_wheel_holds_compiled_modules_stubs_and_py_typed(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "wheel"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "-w", str(out), "--no-deps", "-q",
         "--disable-pip-version-check"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(out.glob("fastvec-*.whl"))
    assert len(wheels) == 1, wheels
    wheel = wheels[0]
    assert wheel.name.startswith(f"fastvec-{fastvec.__version__}-")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"fastvec-{fastvec.__version__}.dist-info/METADATA").decode()
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    expected = {
        f"fastvec/_kernels{suffix}", f"fastvec/_sync{suffix}",
        "fastvec/_kernels.pyi", "fastvec/_sync.pyi", "fastvec/py.typed",
        "fastvec/__init__.py", "fastvec/_version.py", "fastvec/vector_env.py",
        "fastvec/worker.py", "fastvec/layout.py", "fastvec/registration.py",
        "fastvec/errors.py", "fastvec/bench/__main__.py", "fastvec/bench/cli.py",
        "fastvec/bench/plot.py", "fastvec/bench/runner.py", "fastvec/bench/workloads.py",
        "fastvec/bench/ray_backends.py", "fastvec/ray/__init__.py", "fastvec/ray/_actor.py",
        "fastvec/ray/vector_env.py",
        "fastvec/integrations/__init__.py",
        "fastvec/integrations/tianshou.py",
    }
    assert expected <= names, sorted(expected - names)
    # Cython sources, C sources and tests stay out of the wheel
    assert not [n for n in names if n.endswith((".pyx", ".pxd", ".c", ".h"))], sorted(names)
    assert not [n for n in names if n.startswith(("tests/", "examples/", "csrc/"))]
    assert f"Version: {fastvec.__version__}" in metadata
    for line in ("Requires-Dist: numpy", "Requires-Dist: gymnasium", "Provides-Extra: plot",
                 "Provides-Extra: atari", "Provides-Extra: test",
                 "Provides-Extra: tianshou",
                 "Provides-Extra: torchrl"):
        assert line in metadata, line
