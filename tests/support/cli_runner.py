"""Running ``python -m asynccache`` from tests as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli_env(**extra: str) -> dict[str, str]:
    """The test's environment with this checkout importable, plus ``extra``."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def cli_command(*args: str | Path, module: str = "asynccache") -> list[str]:
    """The argv of one command-line run."""
    return [sys.executable, "-m", module, *map(str, args)]


def run_cli(
    *args: str | Path, timeout: float = 600, module: str = "asynccache", **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the command line to its end; ``env`` adds environment variables."""
    return subprocess.run(
        cli_command(*args, module=module),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(**env),
        cwd=ROOT,
        check=False,
    )


def start_cli(*args: str | Path, **env: str) -> subprocess.Popen[str]:
    """Start the command line in the background (for signals and kills)."""
    return subprocess.Popen(
        cli_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(**env),
        cwd=ROOT,
    )


def instance_id(repo: str, commit_hash: str) -> str:
    """The default instance id of a repository and commit."""
    return f"{repo}__{commit_hash[:12]}"
