"""Hand-built image layers and images pushed with the registry's HTTP API (no Docker needed).

Layers are tars written member by member (whiteouts, opaque markers, hardlinks, devices...),
compressed with gzip or zstd or left plain, and pushed with their manifest (Docker schema 2 or
OCI) or an OCI index of several platforms. Images go under ``{registry}/ocitest/...``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

MTIME = 1_700_000_000
#: Repository namespace of every image pushed by these helpers.
NAMESPACE = "ocitest"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

Compression = Literal["gzip", "zstd", "none"]


# --- members -------------------------------------------------------------------------------


class Member(tarfile.TarInfo):
    """A tar member that carries its data."""

    __slots__ = ("data",)

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.data = b""


def file(name: str, data: bytes | str = b"", mode: int = 0o644) -> tarfile.TarInfo:
    """A regular file member (its data in ``.data``)."""
    payload = data.encode() if isinstance(data, str) else data
    info = Member(name)
    info.size, info.mode, info.mtime = len(payload), mode, MTIME
    info.data = payload
    return info


def folder(name: str, mode: int = 0o755) -> tarfile.TarInfo:
    """A directory member."""
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, MTIME
    return info


def symlink(name: str, target: str) -> tarfile.TarInfo:
    """A symlink member."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, target, 0o777, MTIME
    return info


def hardlink(name: str, target: str) -> tarfile.TarInfo:
    """A hardlink member (target is a member name)."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = tarfile.LNKTYPE, target, 0o644, MTIME
    return info


def device(name: str, kind: bytes = tarfile.CHRTYPE) -> tarfile.TarInfo:
    """A character (or block) device member."""
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor, info.mtime = kind, 1, 3, MTIME
    return info


def whiteout(path: str) -> tarfile.TarInfo:
    """``dir/.wh.name``: removes ``dir/name`` of the lower layers."""
    parent, _, base = path.rpartition("/")
    return file(f"{parent}/.wh.{base}" if parent else f".wh.{base}")


def opaque(directory: str) -> tarfile.TarInfo:
    """``dir/.wh..wh..opq``: hides what the lower layers have in ``dir``."""
    return file(f"{directory.rstrip('/')}/.wh..wh..opq")


def tar_bytes(members: Iterable[tarfile.TarInfo]) -> bytes:
    """An uncompressed layer tar of the members, in the order given."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info in members:
            data = info.data if isinstance(info, Member) else b""
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def compress(data: bytes, compression: Compression) -> bytes:
    """The layer blob: gzip (mtime 0), zstd, or the tar itself."""
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(data)
    return data


def sha256(data: bytes) -> str:
    """``sha256:<hex>`` of data."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- images --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One layer: its uncompressed tar and how its blob is compressed."""

    tar: bytes
    compression: Compression = "gzip"

    @property
    def blob(self) -> bytes:
        """The blob as pushed."""
        return compress(self.tar, self.compression)

    @property
    def diff_id(self) -> str:
        """The digest of the uncompressed tar (the image config's ``diff_ids``)."""
        return sha256(self.tar)

    def media_type(self, oci: bool) -> str:
        """The descriptor media type for this compression."""
        if self.compression == "zstd":
            return OCI_ZSTD
        if self.compression == "none":
            return OCI_TAR if oci else DOCKER_TAR
        return OCI_GZIP if oci else DOCKER_GZIP


@dataclass(frozen=True)
class BuiltLayer:
    """A layer made elsewhere (too large to hold as a tar): its blob and diff id."""

    blob: bytes
    diff_id: str
    compression: Compression

    def media_type(self, oci: bool) -> str:
        """The descriptor media type for this compression."""
        return Layer(b"", self.compression).media_type(oci)


def layer(*members: tarfile.TarInfo, compression: Compression = "gzip") -> Layer:
    """A layer of the members."""
    return Layer(tar_bytes(members), compression)


@dataclass(frozen=True)
class Built:
    """An image ready to push: its blobs, manifest bytes and media type."""

    blobs: dict[str, bytes]
    manifest: bytes
    media_type: str

    @property
    def digest(self) -> str:
        """The manifest's digest."""
        return sha256(self.manifest)


def build_image(
    layers: Sequence[Layer | BuiltLayer],
    *,
    oci: bool = False,
    architecture: str = "amd64",
    variant: str = "",
) -> Built:
    """The config, blobs and manifest of an image made of the given layers."""
    config: dict[str, object] = {
        "architecture": architecture,
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [item.diff_id for item in layers]},
        "history": [{"created_by": f"layer {n}"} for n in range(len(layers))],
    }
    if variant:
        config["variant"] = variant
    config_bytes = json.dumps(config, sort_keys=True).encode()
    blobs = {sha256(config_bytes): config_bytes}
    descriptors = []
    for item in layers:
        blob = item.blob
        blobs[sha256(blob)] = blob
        descriptors.append(
            {"mediaType": item.media_type(oci), "size": len(blob), "digest": sha256(blob)}
        )
    media_type = OCI_MANIFEST if oci else DOCKER_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {
            "mediaType": OCI_CONFIG if oci else DOCKER_CONFIG,
            "size": len(config_bytes),
            "digest": sha256(config_bytes),
        },
        "layers": descriptors,
    }
    return Built(blobs, json.dumps(manifest, indent=2).encode(), media_type)


def build_index(images: Mapping[str, Built]) -> bytes:
    """An OCI index of images keyed by ``os/arch[/variant]``."""
    manifests = []
    for platform, image in images.items():
        os_name, arch, *rest = platform.split("/")
        spec = {"os": os_name, "architecture": arch}
        if rest:
            spec["variant"] = rest[0]
        manifests.append(
            {
                "mediaType": image.media_type,
                "size": len(image.manifest),
                "digest": image.digest,
                "platform": spec,
            }
        )
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()


# --- pushing -------------------------------------------------------------------------------


def _call(
    method: str, url: str, data: bytes | None = None, headers: Mapping[str, str] | None = None
) -> tuple[int, Mapping[str, str]]:
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
            return response.status, response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers


def push_blob(registry: str, repository: str, data: bytes) -> str:
    """Upload a blob (monolithic POST + PUT) unless present; return its digest."""
    digest = sha256(data)
    base = f"http://{registry}/v2/{repository}"
    status, _ = _call("HEAD", f"{base}/blobs/{digest}")
    if status == 200:
        return digest
    status, headers = _call("POST", f"{base}/blobs/uploads/", b"")
    if status != 202:
        raise RuntimeError(f"blob upload start answered {status}")
    location = headers["Location"]
    if location.startswith("/"):
        location = f"http://{registry}{location}"
    sep = "&" if "?" in location else "?"
    status, _ = _call(
        "PUT",
        f"{location}{sep}digest={digest}",
        data,
        {"Content-Type": "application/octet-stream"},
    )
    if status != 201:
        raise RuntimeError(f"blob upload of {digest} answered {status}")
    return digest


def push_manifest(
    registry: str, repository: str, reference: str, body: bytes, media_type: str
) -> str:
    """PUT a manifest under a tag or digest; return its digest."""
    url = f"http://{registry}/v2/{repository}/manifests/{reference}"
    status, _ = _call("PUT", url, body, {"Content-Type": media_type})
    if status != 201:
        raise RuntimeError(f"manifest PUT {reference} answered {status}")
    return sha256(body)


def push_image(registry: str, repository: str, tag: str, image: Built) -> str:
    """Push an image's blobs and manifest; return the full reference ``registry/repo:tag``."""
    for blob in image.blobs.values():
        push_blob(registry, repository, blob)
    push_manifest(registry, repository, tag, image.manifest, image.media_type)
    return f"{registry}/{repository}:{tag}"


def push_index(registry: str, repository: str, tag: str, images: Mapping[str, Built]) -> str:
    """Push several platform images and an OCI index of them under tag; return the reference."""
    for image in images.values():
        for blob in image.blobs.values():
            push_blob(registry, repository, blob)
        push_manifest(registry, repository, image.digest, image.manifest, image.media_type)
    push_manifest(registry, repository, tag, build_index(images), OCI_INDEX)
    return f"{registry}/{repository}:{tag}"
