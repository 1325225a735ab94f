"""Packaging: declared imports, the wheel's contents, the version, a cheap ``import asynccache``."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import packages_distributions, version
from pathlib import Path

import asynccache
from tests.support.cache_trees import cache_instance
from tests.support.cli_runner import ROOT, cli_env

PACKAGE = ROOT / "asynccache"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    """The distributions pyproject.toml declares as dependencies."""
    return {
        _normal(re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0])
        for spec in PYPROJECT["project"]["dependencies"]
    }


def imported_modules() -> set[str]:
    """Top-level third-party modules the package imports anywhere (functions included)."""
    found: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "asynccache"}


def test_every_import_of_the_package_is_declared() -> None:
    owners = packages_distributions()
    used = {_normal(owners[module][0]) for module in imported_modules()}
    assert "pyarrow" in used and "datasets" in used
    assert used - declared() == set()


def test_the_wheel_ships_types_licence_and_metadata(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    [wheel] = tmp_path.glob("asynccache-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
        [licence] = [n for n in names if n.endswith("/LICENSE") and ".dist-info/" in n]
        licence_text = archive.read(licence).decode()
    assert "asynccache/py.typed" in names
    assert "License-Expression: MIT" in text
    assert licence_text.startswith("MIT License")
    assert licence_text == (ROOT / "LICENSE").read_text()
    requires = {_normal(re.split(r"[\s<>=!~;\[(]", line[len("Requires-Dist: ") :])[0])
                for line in text.splitlines() if line.startswith("Requires-Dist: ")}  # fmt: skip
    assert {"pyarrow", "datasets", "huggingface-hub"} <= requires
    assert "aiofiles" not in requires


def test_version_comes_from_the_package_metadata() -> None:
    assert asynccache.__version__ == version("asynccache")


def test_reading_a_cache_loads_no_docker_http_or_dataset_library(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    record = cache_instance(cache_dir, "proj", "a" * 40)
    script = f"""
import asyncio, sys
import asynccache
from asynccache import RepoCache

async def main():
    async with RepoCache({str(cache_dir)!r}) as cache:
        assert cache.instance_ids == [{record["instance_id"]!r}]
        assert cache.entry({record["instance_id"]!r})["commit_hash"] == {"a" * 40!r}
        async with cache.checkout({record["instance_id"]!r}, {str(tmp_path / "co")!r},
                                  mode="copy") as repo:
            assert (repo / "README.md").exists() or any(repo.iterdir())

asyncio.run(main())
heavy = {{"aiodocker", "aiohttp", "datasets", "pyarrow", "rich", "stamina", "huggingface_hub"}}
loaded = sorted(heavy & set(sys.modules))
assert loaded == [], loaded
"""
    subprocess.run([sys.executable, "-c", script], check=True, env=cli_env(), cwd=ROOT, timeout=120)


def test_the_command_line_loads_no_http_library_before_a_backend_needs_it() -> None:
    """Worker processes fetch; the main process of a run with them never needs aiohttp."""
    script = """
import sys
import asynccache.api, asynccache.cli.app
loaded = sorted({"aiodocker", "aiohttp"} & set(sys.modules))
assert loaded == [], loaded
"""
    subprocess.run([sys.executable, "-c", script], check=True, env=cli_env(), cwd=ROOT, timeout=120)


def test_the_public_names_still_resolve() -> None:
    for name in asynccache.__all__:
        assert getattr(asynccache, name) is not None, name
    assert asynccache.cache_repos.__module__ == "asynccache.api"
    assert "RepoCache" in dir(asynccache)
