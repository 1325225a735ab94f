"""The one image-reference grammar, Docker's: entries, credentials and both sources use it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from asynccache.errors import InvalidReference

#: Docker Hub as references name it, and the host that serves its registry API.
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
#: The old name of Docker Hub, normalised to DOCKER_HUB.
LEGACY_DOCKER_HUB = "index.docker.io"
#: Longest name (registry host, "/", repository) Docker accepts.
NAME_MAX = 255

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
)
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
# Go's \w is ASCII; Python's is not, so the class is spelled out.
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
#: A content digest whose algorithm Docker (and hashlib) knows, with its exact length.
DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128}")
_IMAGE_ID = re.compile(r"[a-f0-9]{64}")


@dataclass(frozen=True)
class Reference:
    """An image reference as Docker normalises it."""

    domain: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """The host (with port) serving the registry API for this domain."""
        return DOCKER_HUB_API if self.domain == DOCKER_HUB else self.domain

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def name(self) -> str:
        """The full repository name: registry host and repository path."""
        return f"{self.domain}/{self.repository}"

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def is_digest(text: str) -> bool:
    """True when ``text`` is a well-formed content digest (``sha256:<64 hex>``...)."""
    return DIGEST.fullmatch(text) is not None


def parse_reference(image: str) -> Reference:
    """Parse ``image`` as ``docker pull`` does, or raise InvalidReference saying why not.

    The first component is a registry host only when it holds a ``.`` or a ``:`` or is exactly
    ``localhost``; otherwise the image is on Docker Hub (``library/`` for one-component names).
    Upper-case letters in the repository path are refused, so ``Evil/img`` names no host.
    """
    if not image or image.strip() != image:
        raise InvalidReference(image, "empty or surrounded by spaces")
    if _IMAGE_ID.fullmatch(image):
        raise InvalidReference(image, "64 hexadecimal characters are an image id, not a name")
    name, at, digest = image.partition("@")
    if at and not is_digest(digest):
        raise InvalidReference(image, f"bad digest {digest!r}")
    tag: str | None = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidReference(image, f"bad tag {tag!r}")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        domain, path = first, rest
        if not _DOMAIN.fullmatch(domain):
            raise InvalidReference(image, f"bad registry host {domain!r}")
    else:
        domain, path = DOCKER_HUB, name
    if domain == LEGACY_DOCKER_HUB:
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if path.lower() != path:
        raise InvalidReference(
            image,
            f"repository name {path!r} must be lowercase (a registry host has a '.' or a "
            "':port', or is 'localhost')",
        )
    if not all(_PATH_COMPONENT.fullmatch(part) for part in path.split("/")):
        raise InvalidReference(image, f"bad repository name {path!r} (lowercase, digits, ._-)")
    if len(domain) + 1 + len(path) > NAME_MAX:
        raise InvalidReference(image, f"repository name longer than {NAME_MAX} characters")
    return Reference(domain, path, tag, digest or None)
