"""Registry credentials from ~/.docker/config.json, found as the docker CLI finds them."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from asynccache.reference import DOCKER_HUB, Reference, parse_reference

DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"

#: Credentials as the docker config gives them (username/password, or identitytoken).
Credentials = Mapping[str, str]
#: Registry host (``docker.io``, ``ghcr.io``, ``127.0.0.1:5000``) -> its credentials, if any.
CredentialsLookup = Callable[[str], Credentials | None]


def registry_of(image: str | Reference) -> str:
    """The registry host of an image reference, as Docker parses it (Docker Hub by default)."""
    return (parse_reference(image) if isinstance(image, str) else image).domain


def docker_config_path() -> Path:
    """The docker CLI's config file (DOCKER_CONFIG overrides its folder)."""
    folder = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return Path(folder) / "config.json"


def _config_keys(registry: str) -> list[str]:
    if registry == DOCKER_HUB:
        return [DOCKER_HUB_CONFIG_KEY, "index.docker.io", "docker.io", "registry-1.docker.io"]
    return [registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/"]


def _from_helper(helper: str, server: str) -> dict[str, str] | None:
    try:
        done = subprocess.run(
            [f"docker-credential-{helper}", "get"],
            input=server.encode(),
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    data = json.loads(done.stdout)
    secret, user = data.get("Secret", ""), data.get("Username", "")
    if user == "<token>":
        return {"identitytoken": secret, "serveraddress": server}
    return {"username": user, "password": secret, "serveraddress": server}


def _from_auths(entry: dict[str, Any], server: str) -> dict[str, str] | None:
    if entry.get("identitytoken"):
        return {"identitytoken": entry["identitytoken"], "serveraddress": server}
    if entry.get("auth"):
        user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        return {"username": user, "password": password, "serveraddress": server}
    if entry.get("username"):
        return {
            "username": entry["username"],
            "password": entry.get("password", ""),
            "serveraddress": server,
        }
    return None


def credentials_for(
    image: str | Reference, config_path: Path | None = None
) -> dict[str, str] | None:
    """Credentials for the registry of ``image`` (never another registry's)."""
    return registry_credentials(registry_of(image), config_path)


def registry_credentials(registry: str, config_path: Path | None = None) -> dict[str, str] | None:
    """Credentials for ``registry`` (a host): credHelpers, then credsStore, then auths."""
    path = config_path or docker_config_path()
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    keys = _config_keys(registry)
    helpers = config.get("credHelpers") or {}
    for key in keys:
        if key in helpers:
            return _from_helper(helpers[key], key)
    auths = config.get("auths") or {}
    if config.get("credsStore"):
        found = _from_helper(config["credsStore"], keys[0])
        if found:
            return found
    for key in keys:
        if key in auths:
            return _from_auths(auths[key], key)
    return None


def registry_auth_header(image: str | Reference, config_path: Path | None = None) -> str | None:
    """The X-Registry-Auth value for pulling ``image`` (its own registry's), or None."""
    creds = credentials_for(image, config_path)
    if creds is None:
        return None
    return base64.urlsafe_b64encode(json.dumps(creds).encode()).decode()
