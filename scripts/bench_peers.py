"""The benchmark's peers: what a user could run instead of asynccache, without a daemon.

* ``shellN``: a plain shell pipeline, N images at a time (``xargs -P N``): for each image,
  every layer of its manifest is fetched from the registry and piped through ``gzip -dc |
  tar -x`` into a root folder, in order; ``testbed/`` is then moved into the cache folder and
  the rest of the root file system deleted. No whiteouts are applied (a file that a later layer
  deletes stays), nothing is checked, nothing is kept safe: the floor of fetch + inflate +
  untar.
* ``skopeo``: ``skopeo copy docker://IMAGE oci:LAYOUT:TAG`` into one OCI layout shared by the
  whole run (a blob already there is not fetched again), then ``umoci raw unpack`` of the image
  (whiteouts applied: the same tree as ``docker cp``) and the same move of ``testbed/``.

The manifests are read by the benchmark before the timed run (one small GET per image); the
layer URLs are handed to the shell pipeline in a plan file, one image per line.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Sequence
from pathlib import Path

MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
    )
)

#: One image of the shell pipeline: ID BLOB_URL_PREFIX DIGEST... (layers in order).
SHELL_ONE = r"""
set -euo pipefail
id=$1; blobs=$2; shift 2
work="$CACHE/.peer-tmp/$id"
rm -rf "$work"; mkdir -p "$work"
for digest in "$@"; do
    curl -fsS "$blobs/$digest" | gzip -dc | tar -x -C "$work"
done
mv "$work/testbed" "$CACHE/$id"
rm -rf "$work"
"""

#: One image through skopeo and umoci: ID REFERENCE (images run one after another).
SKOPEO_ONE = r"""
set -euo pipefail
id=$1; ref=$2
work="$CACHE/.peer-tmp/$id"
rm -rf "$work"; mkdir -p "$work"
tag=${id//__/-}
skopeo copy -q --src-tls-verify=false "docker://$ref" "oci:$LAYOUT:$tag"
umoci raw unpack --image "$LAYOUT:$tag" "$work/rootfs"
mv "$work/rootfs/testbed" "$CACHE/$id"
rm -rf "$work"
"""


def parse_peer(name: str) -> tuple[str, int] | None:
    """("shell", N) for shellN (shell = shell1), ("skopeo", 1) for skopeo, else None."""
    if name == "skopeo":
        return "skopeo", 1
    match = re.fullmatch(r"shell(\d*)", name)
    if match:
        return "shell", int(match.group(1) or 1)
    return None


def layer_digests(registry: str, repository: str, tag: str) -> list[str]:
    """The layer digests of an image's manifest, in order (plain HTTP registry)."""
    request = urllib.request.Request(
        f"http://{registry}/v2/{repository}/manifests/{tag}", headers={"Accept": MANIFEST_TYPES}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        manifest = json.loads(response.read())
    return [layer["digest"] for layer in manifest["layers"]]


def write_plan(path: Path, images: Sequence[tuple[str, str]]) -> Path:
    """The plan file of the peers: one line per (instance_id, registry/repository:tag)."""
    lines = []
    for instance_id, ref in images:
        registry, rest = ref.split("/", 1)
        repository, _, tag = rest.rpartition(":")
        blobs = f"http://{registry}/v2/{repository}/blobs"
        digests = layer_digests(registry, repository, tag)
        lines.append(" ".join([instance_id, blobs, *digests, "#", ref]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def peer_command(kind: str, jobs: int, plan: Path, cache: Path, work: Path) -> list[str]:
    """The command line that runs a peer over every image of the plan into cache.

    ``work`` holds the scripts (and, for skopeo, the OCI layout, which the caller deletes).
    """
    work.mkdir(parents=True, exist_ok=True)
    if kind == "shell":
        script = work / "shell_one.sh"
        script.write_text(SHELL_ONE, encoding="utf-8")
        # each plan line without the trailing "# ref" comment
        driver = (
            f'set -euo pipefail; mkdir -p "$CACHE"; sed "s/ # .*//" {plan} | '
            f'xargs -P {jobs} -L 1 bash {script}; rm -rf "$CACHE/.peer-tmp"'
        )
    elif kind == "skopeo":
        script = work / "skopeo_one.sh"
        script.write_text(SKOPEO_ONE, encoding="utf-8")
        driver = (
            f'set -euo pipefail; mkdir -p "$CACHE"; '
            f"sed 's/^\\([^ ]*\\) .* # \\(.*\\)$/\\1 \\2/' {plan} | "
            f'xargs -L 1 bash {script}; rm -rf "$CACHE/.peer-tmp"'
        )
    else:
        raise ValueError(f"unknown peer {kind!r}")
    return ["bash", "-c", driver]


def peer_env(cache: Path, work: Path) -> dict[str, str]:
    """The variables the peer scripts read."""
    return {"CACHE": str(cache), "LAYOUT": str(work / "oci-layout")}
