"""The registry backend: /testbed read straight from image layers, no Docker daemon needed."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import anyio
import anyio.to_thread

from asynccache import config
from asynccache.entries import Entry
from asynccache.errors import NoTestbed, SetupError, TransferFailed
from asynccache.reference import parse_reference
from asynccache.sources.credentials import CredentialsLookup
from asynccache.sources.ratelimit import PullGate
from asynccache.sources.registry.client import RegistryClient
from asynccache.sources.registry.layer_store import DEFAULT_CACHE_BYTES, LayerStore
from asynccache.sources.registry.manifest import Descriptor, ImageManifest, parse_platform
from asynccache.sources.registry.totals import totals_line
from asynccache.tree.budget import Budget
from asynccache.tree.dedup import ContentStore
from asynccache.tree.exclude import ExcludeRules
from asynccache.tree.extract import ExtractResult
from asynccache.tree.layered import LayerTree

log = logging.getLogger(__name__)

#: Seconds allowed to connect, and between two reads of one response.
CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 120.0


class RegistryBackend:
    """A Source that applies an image's layers, fetched from its registry, into a folder."""

    def __init__(
        self,
        layer_cache_dir: Path | None = None,
        *,
        platform: str = config.platform,
        insecure_registries: Iterable[str] = (),
        registry_mirror: str | None = None,
        pull_gate: PullGate | None = None,
        testbed_path: str = config.testbed_path,
        layer_cache_bytes: int = DEFAULT_CACHE_BYTES,
        credentials: CredentialsLookup | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        work_name: str | None = None,
        entry_timeout: float = config.pull_timeout,
        max_testbed_bytes: int = config.max_testbed_bytes,
        max_testbed_files: int = config.max_testbed_files,
        store: ContentStore | None = None,
        exclude: ExcludeRules | None = None,
        log_totals: bool = True,
    ) -> None:
        """``entry_timeout``: seconds one entry may take (pauses of a rate limit not counted);
        ``max_testbed_bytes``, ``max_testbed_files``: what its layers may hold (see Budget);
        ``log_totals``: log what was downloaded on closing (a pool's worker leaves it to the
        pool, which logs the sum)."""
        self.log_totals = log_totals
        try:
            self.platform = parse_platform(platform)
        except ValueError as exc:
            raise SetupError(f"--platform: {exc}") from None
        self.root = testbed_path.strip("/")
        if not self.root:
            raise SetupError("the testbed path must name a folder")
        self.testbed_path = "/" + self.root
        self.insecure_registries = tuple(insecure_registries)
        self.registry_mirror = registry_mirror
        self.pull_gate = pull_gate or PullGate()
        self.entry_timeout = entry_timeout
        self.max_testbed_bytes = max_testbed_bytes
        self.max_testbed_files = max_testbed_files
        # The blob cache lives apart from the cache folder (which is what gets shipped).
        layers = Path(layer_cache_dir) if layer_cache_dir else config.default_layer_cache_dir()
        folder = layers if layer_cache_bytes > 0 else None
        self.layers = LayerStore(
            folder, root=self.root, max_bytes=layer_cache_bytes, work_name=work_name
        )
        self._credentials = credentials
        # what every tree is linked from and leaves out (see tree/dedup.py, tree/exclude.py)
        self.store = store
        self.exclude = exclude
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None
        self._client: RegistryClient | None = None
        self._manifests: dict[str, ImageManifest] = {}
        self._manifest_locks: dict[str, anyio.Lock] = {}

    async def __aenter__(self) -> RegistryBackend:
        await anyio.to_thread.run_sync(self.layers.open)
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            auto_decompress=False,
            trust_env=True,
            connector=aiohttp.TCPConnector(limit=64, limit_per_host=16),
        )
        self._client = RegistryClient(
            self._session,
            insecure_registries=self.insecure_registries,
            registry_mirror=self.registry_mirror,
            credentials=self._credentials,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        self.layers.close()
        if self.log_totals:
            log.info("%s", totals_line(self.totals(), self.testbed_path))

    def totals(self) -> dict[str, int]:
        """What this backend downloaded and how it got each layer, so far."""
        return {
            "bytes": self.bytes_downloaded,
            "fetched": self.layers.fetches,
            "cached": self.layers.cache_hits,
            "skipped": self.layers.skipped,
        }

    @property
    def client(self) -> RegistryClient:
        """The open registry client (enter the backend first)."""
        if self._client is None:
            raise RuntimeError("RegistryBackend is not open")
        return self._client

    @property
    def bytes_downloaded(self) -> int:
        """Bytes of manifests and compressed layers fetched from registries so far."""
        return self._client.bytes_downloaded if self._client is not None else 0

    async def manifest(self, image: str) -> ImageManifest:
        """The image's manifest for the platform, fetched once (all pulls pause on rate limits)."""
        known = self._manifests.get(image)
        if known is not None:
            return known
        lock = self._manifest_locks.setdefault(image, anyio.Lock())
        async with lock:
            known = self._manifests.get(image)
            if known is not None:
                return known
            ref = parse_reference(image)
            found = await self.pull_gate.through(
                image, lambda: self.client.resolve(ref, self.platform)
            )
            self._manifests[image] = found
            return found

    async def prepare(self, entry: Entry) -> None:
        """Nothing to fetch ahead: manifests and layers are fetched while extracting."""

    async def extract_into(self, entry: Entry, dest: Path) -> ExtractResult:
        """Apply the image's layers in order into the empty folder dest; keep only /testbed.

        The whole entry (its manifest, layers and their extraction) gets ``entry_timeout``
        seconds, so that a registry that trickles its answers cannot hold a worker for ever.
        """
        done: list[ExtractResult] = []
        failed: list[Exception] = []
        expired = False

        async def extract(scope: anyio.CancelScope) -> None:
            try:
                done.append(await self._extract(entry, dest))
            except Exception as exc:
                failed.append(exc)
            finally:
                scope.cancel()

        async def watch(scope: anyio.CancelScope) -> None:
            nonlocal expired
            await self._spend(self.entry_timeout)
            expired = True
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(extract, tg.cancel_scope)
            tg.start_soon(watch, tg.cancel_scope)
        if failed:
            raise failed[0]
        if not done:
            assert expired
            raise TransferFailed(
                f"reading /testbed of {entry.docker_image} from its registry took longer than "
                f"{self.entry_timeout:g} s; raise --pull_timeout"
            )
        return done[0]

    async def _spend(self, seconds: float) -> None:
        """Return once seconds have passed, leaving out the time every pull was paused."""
        spent, last = 0.0, anyio.current_time()
        while spent < seconds:
            await anyio.sleep(min(1.0, seconds - spent))
            now = anyio.current_time()
            if not self.pull_gate.paused:
                spent += now - last
            last = now

    async def _extract(self, entry: Entry, dest: Path) -> ExtractResult:
        image = entry.docker_image
        manifest = await self.manifest(image)
        budget = Budget(self.max_testbed_bytes, self.max_testbed_files)
        tree = LayerTree(
            dest,
            root=self.root,
            keep_hashes=True,
            budget=budget,
            store=self.store,
            exclude=self.exclude,
        )
        for layer in manifest.layers:
            await self.layers.apply(
                tree,
                image,
                layer.digest,
                layer.size,
                functools.partial(self._blob, image, manifest, layer),
            )
        if not tree.present:
            raise NoTestbed(image, self.testbed_path)
        return await anyio.to_thread.run_sync(tree.finish)

    @asynccontextmanager
    async def _blob(
        self, image: str, manifest: ImageManifest, layer: Descriptor
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """The chunks of one layer blob (waiting while the registry's rate limit lasts)."""
        response = await self.pull_gate.through(
            image, lambda: self.client.open_blob(manifest, layer.digest)
        )
        try:
            yield self.client.iter_blob(response)
        finally:
            response.close()

    async def after_extraction(self, entry: Entry) -> None:
        """Forget the entry's manifest once the entry is done."""
        self._manifests.pop(entry.docker_image, None)
        self._manifest_locks.pop(entry.docker_image, None)
