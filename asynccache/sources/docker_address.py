"""Where the Docker daemon is: DOCKER_HOST, else the sockets where Docker puts one."""

from __future__ import annotations

import os
from pathlib import Path

#: Where aiodocker (like the docker CLI) looks for the daemon's socket without DOCKER_HOST.
SOCKET_PATHS = (
    Path("/run/docker.sock"),
    Path("/var/run/docker.sock"),
    Path.home() / ".docker" / "run" / "docker.sock",
)


def daemon_address() -> str:
    """The daemon address we try: DOCKER_HOST, else the default socket."""
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
