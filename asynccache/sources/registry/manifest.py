"""Manifests: media types, platforms, descriptors, the resolved image manifest, digest checks."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from asynccache.errors import DigestMismatch, ImageNotFound, RegistryError
from asynccache.reference import Reference, is_digest
from asynccache.sources.registry.endpoints import Endpoint

MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
MEDIA_DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MANIFEST_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST, MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
INDEX_TYPES = frozenset({MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST})
IMAGE_TYPES = frozenset({MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST})

#: Largest manifest accepted (containerd's limit).
MAX_MANIFEST_BYTES = 4 << 20


@dataclass(frozen=True)
class Platform:
    """An os/architecture[/variant] triple."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)


_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm"}
_DEFAULT_VARIANTS = {"arm64": "v8", "arm": "v7", "amd64": "v1"}


def parse_platform(text: str) -> Platform:
    """Parse ``linux/amd64`` or ``linux/arm64/v8`` (architecture aliases normalised)."""
    parts = [part.strip().lower() for part in text.split("/")]
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"platform must be os/arch[/variant], not {text!r}")
    arch = _ARCH_ALIASES.get(parts[1], parts[1])
    return Platform(parts[0], arch, parts[2] if len(parts) == 3 else "")


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor of a manifest: media type, digest, size (and platform in an index)."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None


def descriptor(raw: Any, image: str) -> Descriptor:
    """A descriptor from its JSON, checked (digest form, size) before anything is fetched by it."""
    if not isinstance(raw, dict):
        raise RegistryError(image, "a descriptor is not an object")
    digest, size = raw.get("digest"), raw.get("size")
    if not isinstance(digest, str) or not is_digest(digest):
        raise RegistryError(image, f"unsupported or malformed digest {digest!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RegistryError(image, f"bad size {size!r} for {digest}")
    platform = None
    spec = raw.get("platform")
    if isinstance(spec, dict):
        arch = str(spec.get("architecture", "")).lower()
        platform = Platform(
            str(spec.get("os", "")).lower(),
            _ARCH_ALIASES.get(arch, arch),
            str(spec.get("variant", "")).lower(),
        )
    return Descriptor(str(raw.get("mediaType", "")), digest, size, platform)


def select_platform(manifests: Iterable[Descriptor], want: Platform, image: str) -> Descriptor:
    """The index entry for ``want`` (variants compared with their defaults filled in)."""
    offered: list[Descriptor] = [d for d in manifests if d.platform is not None]
    wanted_variant = want.variant or _DEFAULT_VARIANTS.get(want.architecture, "")
    fallback: Descriptor | None = None
    for item in offered:
        got = item.platform
        if got is None or got.os != want.os or got.architecture != want.architecture:
            continue
        variant = got.variant or _DEFAULT_VARIANTS.get(got.architecture, "")
        if variant == wanted_variant:
            return item
        if not want.variant and fallback is None:
            fallback = item
    if fallback is not None:
        return fallback
    have = ", ".join(sorted({str(d.platform) for d in offered})) or "none"
    raise ImageNotFound(image, f"no {want} image in its index (platforms: {have}); see --platform")


@dataclass(frozen=True)
class ImageManifest:
    """A resolved image manifest: its digest, its layers, and the endpoint it came from."""

    reference: Reference
    digest: str
    media_type: str
    layers: tuple[Descriptor, ...]
    endpoint: Endpoint


def media_type(body: bytes) -> str:
    """The media type a manifest body declares, or the one its shape implies ("" if neither)."""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if isinstance(data, dict):
        value = data.get("mediaType")
        if isinstance(value, str):
            return value
        if data.get("schemaVersion") == 1:
            return MEDIA_DOCKER_SCHEMA1
        if isinstance(data.get("manifests"), list):
            return MEDIA_OCI_INDEX
        if isinstance(data.get("layers"), list):
            return MEDIA_OCI_MANIFEST
    return ""


def manifest_json(body: bytes, image: str) -> dict[str, Any]:
    """A manifest body as a JSON object, or RegistryError."""
    try:
        data = json.loads(body)
    except ValueError:
        raise RegistryError(image, "manifest is not JSON") from None
    if not isinstance(data, dict):
        raise RegistryError(image, "manifest is not a JSON object")
    return data


def verify(image: str, digest: str, body: bytes) -> None:
    """Raise DigestMismatch unless ``body`` hashes to ``digest``."""
    algorithm, _, expected = digest.partition(":")
    actual = hashlib.new(algorithm, body).hexdigest()
    if actual != expected:
        raise DigestMismatch(image, digest, f"got {algorithm}:{actual}")
