"""The only module that talks to Docker: pull, create, stream /testbed into a tree, remove."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import aiodocker
import aiohttp
import anyio

from asynccache import config
from asynccache.config import CONTAINER_LABEL, SHARD_LABEL
from asynccache.entries import Entry
from asynccache.errors import (
    CacheError,
    DaemonInterrupted,
    DaemonUnavailable,
    ImageNotFound,
    NoDaemonFound,
    NoTestbed,
    PullFailed,
    TransferFailed,
    one_line,
)
from asynccache.reference import Reference, parse_reference
from asynccache.sources.credentials import registry_auth_header
from asynccache.sources.daemon_gate import DaemonGate, DaemonGateState
from asynccache.sources.docker_address import SOCKET_PATHS, daemon_address
from asynccache.sources.docker_errors import raise_on_stream_error, translated
from asynccache.sources.image_hold import RepositoryHold
from asynccache.sources.ratelimit import PullGate, StatusCallback
from asynccache.tree.budget import Budget
from asynccache.tree.dedup import ContentStore
from asynccache.tree.exclude import ExcludeRules
from asynccache.tree.extract import ExtractResult, extract_stream

log = logging.getLogger(__name__)

T = TypeVar("T")

CHUNK_SIZE = 1 << 20
CREATE_TIMEOUT = 120.0


def container_name(instance_id: str) -> str:
    """A fresh container name for an entry, so that a create whose answer was lost is found."""
    readable = re.sub(r"[^a-zA-Z0-9_.-]", "-", instance_id)[:80]
    return f"asynccache-{readable}-{secrets.token_hex(4)}"


def pull_params(ref: Reference) -> dict[str, str]:
    """The pull API's parameters for ``ref``: its full name, and its digest or tag."""
    return {"fromImage": ref.name, "tag": ref.digest or ref.tag or "latest"}


class DockerBackend:
    """A Source that streams /testbed out of images through a Docker daemon into a tree."""

    def __init__(
        self,
        cache_dir: Path,
        *,
        pull_timeout: float = config.pull_timeout,
        cp_timeout: float = config.cp_timeout,
        skip_pull: bool = False,
        keep_images: bool = False,
        testbed_path: str = config.testbed_path,
        pull_gate: PullGate | None = None,
        shard_name: str | None = None,
        daemon_wait: float = config.daemon_wait,
        on_status: StatusCallback | None = None,
        daemon_state: DaemonGateState | None = None,
        max_testbed_bytes: int = config.max_testbed_bytes,
        max_testbed_files: int = config.max_testbed_files,
        store: ContentStore | None = None,
        exclude: ExcludeRules | None = None,
    ) -> None:
        """``max_testbed_bytes``, ``max_testbed_files``: what one archive may hold (Budget)."""
        self.cache_dir = cache_dir
        self.max_testbed_bytes = max_testbed_bytes
        self.max_testbed_files = max_testbed_files
        # what every tree is linked from and leaves out (see tree/dedup.py, tree/exclude.py)
        self.store = store
        self.exclude = exclude
        #: A shard's run labels its containers with its shard and sweeps only those: the
        #: other shards of the cache folder may share this daemon.
        self.shard_name = shard_name
        self.pull_timeout = pull_timeout
        self.cp_timeout = cp_timeout
        self.skip_pull = skip_pull
        self.keep_images = keep_images
        self.testbed_path = testbed_path
        self.address = daemon_address()
        self._docker: aiodocker.Docker | None = None
        self._pulled_by_us: set[str] = set()
        self._hold = RepositoryHold()
        self.pull_gate = pull_gate or PullGate()
        #: Every call waits here while the daemon is away (a restart), up to ``daemon_wait``.
        self.daemon = DaemonGate(
            self.ping,
            address=self.address,
            max_wait=daemon_wait,
            on_status=on_status,
            on_back=self._remove_deferred,
            state=daemon_state,
        )
        #: Containers and images whose removal met the daemon away: removed once it is back.
        self._deferred_containers: set[str] = set()
        self._deferred_images: set[str] = set()

    async def __aenter__(self) -> DockerBackend:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if not self.daemon.waiting:
                await self._remove_deferred()
            for image in self._hold.drain():
                await self.remove_image(image)
            if self._deferred_containers or self._deferred_images:
                log.warning(
                    "the Docker daemon is away: %d containers are left for the next run to "
                    "remove, %d pulled images are left in place",
                    len(self._deferred_containers),
                    len(self._deferred_images),
                )
        finally:
            await self.close()

    @property
    def docker(self) -> aiodocker.Docker:
        """The open client (connect first)."""
        if self._docker is None:
            raise RuntimeError("DockerBackend is not connected")
        return self._docker

    async def connect(self) -> None:
        """Open the client and check that the daemon answers; raise DaemonUnavailable if not."""
        try:
            self._docker = aiodocker.Docker()
        except AssertionError:
            # aiodocker asserts when it finds no address: Docker absent or not started.
            raise NoDaemonFound([str(path) for path in SOCKET_PATHS]) from None
        except (ValueError, OSError, aiodocker.DockerError) as exc:
            raise DaemonUnavailable(self.address, str(exc)) from None
        try:
            await self.ping()
        except BaseException:
            await self.close()
            raise

    async def ping(self, timeout: float = 30.0) -> None:
        """Raise DaemonUnavailable unless the daemon answers within ``timeout`` seconds."""
        try:
            with anyio.fail_after(timeout):
                await self.docker.version()
        except TimeoutError:
            raise DaemonUnavailable(self.address, f"no answer in {timeout:.0f} s") from None
        except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
            raise DaemonUnavailable(self.address, one_line(exc)) from None

    async def close(self) -> None:
        """Close the client."""
        if self._docker is not None:
            await self._docker.close()
            self._docker = None

    async def _call(self, target: str, call: Callable[[], Awaitable[T]]) -> T:
        """One daemon call (``target`` names what it is about), its errors translated; while
        the daemon is away it waits for it and runs again. Only for calls that may repeat."""

        async def once() -> T:
            async with translated(self.address, target):
                return await call()

        return await self.daemon.call(once)

    async def image_present(self, image: str) -> bool:
        """True when the daemon has ``image`` locally."""
        try:
            await self._call(image, lambda: self.docker.images.inspect(image))
        except ImageNotFound:
            return False
        return True

    async def pull(self, image: str) -> None:
        """Pull ``image`` with its own registry's credentials; errors become domain errors.

        A pull cut by the daemon going away is made again once it is back; the wait is not
        counted in ``pull_timeout``.
        """
        await self.daemon.call(lambda: self._pull_once(image))
        if not await self.image_present(image):
            raise PullFailed(image, "the pull ended but the image is not present")

    async def _pull_once(self, image: str) -> None:
        ref = parse_reference(image)
        params = pull_params(ref)
        headers = {"X-Registry-Auth": registry_auth_header(ref) or "e30="}
        try:
            with anyio.fail_after(self.pull_timeout):
                async with (
                    translated(self.address, image),
                    self.docker._query(
                        "images/create",
                        "POST",
                        params=params,
                        headers=headers,
                        timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
                    ) as response,
                ):
                    async for line in response.content:
                        raise_on_stream_error(image, line)
        except TimeoutError:
            raise PullFailed(image, f"timed out after {self.pull_timeout:.0f} s") from None

    async def ensure_image(self, image: str) -> None:
        """Make ``image`` present locally: pull it unless present (never with skip_pull)."""
        if await self.image_present(image):
            return
        if self.skip_pull:
            raise ImageNotFound(image, "not present locally and --skip_pull is set")
        await self.pull_gate.through(image, lambda: self.pull(image))
        self._pulled_by_us.add(image)

    async def create_container(self, entry: Entry) -> str:
        """Create (never start) a labelled container of the entry's image; return its id.

        A create cut by the daemon going away is made again, under a new name, once it is
        back; the container of the cut one, if the daemon made it, is removed.
        """
        spec: dict[str, Any] = {
            "Image": entry.docker_image,
            "Cmd": ["/testbed-never-started"],
            "Entrypoint": [],
            "Labels": {
                CONTAINER_LABEL: str(self.cache_dir),
                "io.asynccache.instance_id": entry.instance_id,
                **({SHARD_LABEL: self.shard_name} if self.shard_name else {}),
            },
            "NetworkDisabled": True,
            "HostConfig": {"NetworkMode": "none"},
        }
        return await self.daemon.call(lambda: self._create_once(entry, spec))

    async def _create_once(self, entry: Entry, spec: dict[str, Any]) -> str:
        name = container_name(entry.instance_id)
        try:
            # Shielded: a create cancelled in flight could still finish in the daemon
            # after we gave up on it, leaving a container nobody knows the id of.
            with anyio.CancelScope(shield=True), anyio.fail_after(CREATE_TIMEOUT):
                async with translated(self.address, entry.docker_image):
                    container = await self.docker.containers.create(spec, name=name)
        except BaseException:
            await self.remove_container(name)
            raise
        return str(container.id)

    async def remove_container(self, container_id: str) -> None:
        """Force-remove a container; shielded so that cancellation cannot leak it.

        With the daemon away it is removed once the daemon is back (never waited for here).
        """
        with anyio.CancelScope(shield=True):
            await self._remove(
                container_id,
                f"container {container_id[:12]}",
                lambda: self.docker._query_json(
                    f"containers/{container_id}", "DELETE", params={"force": "1", "v": "1"}
                ),
                self._deferred_containers,
            )

    async def remove_image(self, image: str) -> None:
        """Remove an image this run pulled (unless keep_images); failures only warn."""
        if self.keep_images or image not in self._pulled_by_us:
            return
        self._pulled_by_us.discard(image)
        with anyio.CancelScope(shield=True):
            await self._remove(
                image,
                f"image {image}",
                lambda: self.docker.images.delete(image, force=True),
                self._deferred_images,
            )

    async def _remove(
        self, target: str, label: str, call: Callable[[], Awaitable[object]], deferred: set[str]
    ) -> None:
        """Remove ``target``; when the daemon is away, put it in ``deferred`` for later."""
        for _ in range(2):
            if self.daemon.waiting or self.daemon.exhausted:
                break
            try:
                async with translated(self.address, target):
                    await call()
            except ImageNotFound:
                pass  # already gone
            except DaemonUnavailable as exc:
                # A pooled connection to a daemon that just restarted fails once: try again
                # when the daemon answers a ping.
                if await self.daemon.confirm_down(exc):
                    break
                continue
            except CacheError as exc:
                log.warning("could not remove %s: %s", label, exc)
                return
            deferred.discard(target)
            return
        deferred.add(target)
        log.info("%s is removed once the Docker daemon answers again", label)

    async def _remove_deferred(self) -> None:
        """Remove what the daemon's absence left (called when it answers again)."""
        for container_id in sorted(self._deferred_containers):
            await self.remove_container(container_id)
        for image in sorted(self._deferred_images):
            self._pulled_by_us.add(image)
            await self.remove_image(image)

    async def remove_leaked_containers(self) -> int:
        """Remove containers left by an earlier run on this cache folder; return how many."""
        labels = [f"{CONTAINER_LABEL}={self.cache_dir}"]
        if self.shard_name:
            labels.append(f"{SHARD_LABEL}={self.shard_name}")
        async with translated(self.address, "containers"):
            leaked = await self.docker.containers.list(all=True, filters={"label": labels})
        for container in leaked:
            await self.remove_container(str(container.id))
        return len(leaked)

    async def prepare(self, entry: Entry) -> None:
        """Pull the entry's image if needed (before an extraction slot is taken)."""
        await self.ensure_image(entry.docker_image)

    @asynccontextmanager
    async def testbed_archive(self, entry: Entry) -> AsyncIterator[AsyncIterator[bytes]]:
        """Yield the tar bytes of the image's /testbed; the container is removed on exit."""
        await self.ensure_image(entry.docker_image)
        container_id = await self.create_container(entry)
        try:
            path = quote(self.testbed_path, safe="/")
            try:
                response = await self._call(
                    entry.docker_image,
                    lambda: self.docker._do_query(
                        f"containers/{container_id}/archive?path={path}",
                        "GET",
                        headers={"Accept-Encoding": "identity"},
                        timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
                    ),
                )
            except ImageNotFound:
                raise NoTestbed(entry.docker_image, self.testbed_path) from None
            try:
                yield self._iter_body(response)
            finally:
                response.close()
        finally:
            await self.remove_container(container_id)

    async def _iter_body(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """The archive's chunks. A stream cut by the daemon going away cannot go on where it
        broke: DaemonInterrupted starts the entry again once the daemon is back."""
        try:
            async for chunk in response.content.iter_chunked(CHUNK_SIZE):
                yield chunk
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, ConnectionError) as exc:
            detail = one_line(exc)
        else:
            return
        if await self.daemon.confirm_down(DaemonUnavailable(self.address, detail)):
            raise DaemonInterrupted(f"the archive stream broke: {detail}")
        raise TransferFailed(f"archive stream broke: {detail}")

    async def extract_into(self, entry: Entry, dest: Path) -> ExtractResult:
        """Stream the image's /testbed into the empty folder dest, within ``cp_timeout``."""
        budget = Budget(self.max_testbed_bytes, self.max_testbed_files)
        async with self.testbed_archive(entry) as chunks:
            try:
                with anyio.fail_after(self.cp_timeout):
                    return await extract_stream(
                        chunks,
                        dest,
                        keep_hashes=True,
                        budget=budget,
                        store=self.store,
                        exclude=self.exclude,
                    )
            except TimeoutError:
                raise TransferFailed(
                    f"copying /testbed of {entry.docker_image} took longer than "
                    f"{self.cp_timeout:.0f} s; raise --cp_timeout"
                ) from None

    async def after_extraction(self, entry: Entry) -> None:
        """Release the entry's image when this run pulled it (see RepositoryHold)."""
        if (self._deferred_containers or self._deferred_images) and not self.daemon.waiting:
            # The daemon is back (another process of the run may have seen it first).
            await self._remove_deferred()
        image = entry.docker_image
        if self.keep_images or image not in self._pulled_by_us:
            return
        older = self._hold.done_with(image)
        if older is not None:
            await self.remove_image(older)
