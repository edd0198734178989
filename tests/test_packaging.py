"""The wheel users install: everything under the dsref import root, the data files, nothing else.

Built with ``pip wheel --no-deps`` from a copy of the sources in tmp_path (an in-tree build would
leave build/ and *.egg-info in the checkout, and a stale build/lib can leak removed files into
the wheel). .ci/run also installs such a wheel in a fresh venv and runs the CLI from an empty
directory.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]  # dsref.sim -> sim
PACKAGES: list[str] = PYPROJECT["tool"]["setuptools"]["packages"]


def _source_dir(pkg_name: str) -> Path:
    """Source folder of a declared package: its package-dir root plus the rest of the dotted name."""
    root = max((p for p in PACKAGE_DIRS if pkg_name == p or pkg_name.startswith(p + ".")), key=len)
    return ROOT / PACKAGE_DIRS[root] / Path(*pkg_name[len(root):].split(".")[1:])


#: Data files each package must ship (globs relative to its source folder).
DATA = {"dsref.hwmodels": ["data/**/*.toml"], "dsref.sim": ["scenarios/*.toml"],
        "dsref.experiments": ["data/*.json"]}


def _setuptools_ok() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 68


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / f, src / f)
    for folder in PACKAGE_DIRS.values():
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = src / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)]
    if _setuptools_ok():  # build offline with this environment's setuptools
        cmd.insert(4, "--no-build-isolation")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (whl,) = dist.glob("deepseek_ref-*.whl")
    return whl


@pytest.fixture(scope="module")
def wheel_names(wheel) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def test_wheel_holds_only_the_dsref_tree(wheel_names):
    info = [n for n in wheel_names if n.split("/")[0].endswith(".dist-info")]
    pkg = [n for n in wheel_names if n not in info]
    assert pkg and all(n.startswith("dsref/") for n in pkg), sorted({n.split("/")[0] for n in pkg})
    assert "dsref/__init__.py" not in pkg  # dsref is a namespace package
    for folder in ("tests", "docs", "benchmarks", "shared"):
        assert not [n for n in wheel_names if folder in n.split("/")[:-1]], folder
    for pkg_name in PACKAGES:
        assert f"{pkg_name.replace('.', '/')}/__init__.py" in pkg, pkg_name


def test_wheel_holds_every_module_and_data_file(wheel_names):
    names = set(wheel_names)
    for root, folder in PACKAGE_DIRS.items():  # every folder with an __init__.py is a declared package
        for init in (ROOT / folder).rglob("__init__.py"):
            sub = init.parent.relative_to(ROOT / folder).parts
            assert ".".join((root, *sub)) in PACKAGES, f"{init.parent} is not in [tool.setuptools] packages"
    for pkg_name in PACKAGES:  # every module of every declared package, subpackages included
        dest = pkg_name.replace(".", "/")
        for py in _source_dir(pkg_name).glob("*.py"):
            assert f"{dest}/{py.name}" in names, py
    for pkg_name, folder in PACKAGE_DIRS.items():
        dest = pkg_name.replace(".", "/")
        for pattern in DATA.get(pkg_name, []):
            files = sorted((ROOT / folder).glob(pattern))
            assert files, (folder, pattern)
            missing = [str(f.relative_to(ROOT)) for f in files
                       if f"{dest}/{f.relative_to(ROOT / folder).as_posix()}" not in names]
            assert not missing, f"not in the wheel (pyproject [tool.setuptools.package-data]): {missing}"
    assert "dsref/experiments/data/public_claims.json" in names
    assert "dsref/hwmodels/data/efficiency.toml" in names
    assert "dsref/hwmodels/data/llama_cpp_overhead.toml" in names


def test_wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        info = next(n.split("/")[0] for n in z.namelist() if n.endswith(".dist-info/WHEEL"))
        entry_points = z.read(f"{info}/entry_points.txt").decode()
        top_level = z.read(f"{info}/top_level.txt").decode().split()
    assert "dsref = dsref.experiments.cli:main" in entry_points
    assert top_level == ["dsref"]
