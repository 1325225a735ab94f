"""Running ``python -m asynccache`` from tests as a user would."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
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


def run_in_pty(
    *args: str | Path, timeout: float = 300, columns: int = 160, **env: str
) -> tuple[int, str]:
    """Run the command line with a pseudo-terminal as stdin, stdout and stderr.

    Returns the exit code and everything the terminal received, control sequences included.
    """
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    process = subprocess.Popen(
        cli_command(*args),
        stdin=child,
        stdout=child,
        stderr=child,
        env=cli_env(COLUMNS=str(columns), **env),
        cwd=ROOT,
    )
    os.close(child)
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 1.0)
        if not ready:
            if process.poll() is not None:
                break
            continue
        try:
            data = os.read(main, 65536)
        except OSError:
            break
        if not data:
            break
        output += data
    os.close(main)
    return process.wait(timeout=30), output.decode(errors="replace")


_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def screen_lines(text: str) -> list[str]:
    """What a terminal shows line by line: control sequences dropped, split at CR and LF."""
    return [line for line in re.split(r"[\r\n]+", _CONTROL.sub("", text)) if line.strip()]
