"""Domain errors: every failure the cache can meet, with a clear one-line message."""

from __future__ import annotations

from pathlib import Path


def one_line(exc: BaseException) -> str:
    """An exception as one short line for a message: its first line, or its type when empty."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


class CacheError(Exception):
    """Base of every error asynccache raises on purpose."""

    #: True when retrying the same operation later may succeed.
    transient: bool = False
    #: True when the run's conditions, not the entry, failed it for good in this run (a rate
    #: limit that did not lift, the daemon gone, a full disk): a later run may cache it.
    retry_later: bool = False


class SetupError(CacheError):
    """The run cannot start (bad flags, unusable cache folder, no daemon); exit code 2."""


class DatasetError(SetupError):
    """The dataset or split cannot be loaded."""


class CacheLocked(SetupError):
    """Another process holds the cache folder's lock."""


class InvalidEntry(CacheError):
    """A dataset row cannot become an entry (missing field, unsafe id, bad image reference)."""

    def __init__(self, row_number: int, reason: str) -> None:
        self.row_number = row_number
        self.reason = reason
        super().__init__(f"row {row_number}: {reason}")


class DaemonUnavailable(SetupError):
    """The Docker daemon cannot be reached."""

    transient = True
    retry_later = True

    def __init__(self, address: str, detail: str) -> None:
        self.address = address
        self.detail = detail
        super().__init__(
            f"cannot reach the Docker daemon at {address} ({detail}); start dockerd, "
            "or set DOCKER_HOST to its address, or use --dry_run"
        )


class DaemonGone(CacheError):
    """The Docker daemon went away during the run and did not come back within the wait."""

    retry_later = True

    def __init__(self, address: str, waited: float) -> None:
        self.address = address
        self.waited = waited
        super().__init__(
            f"the Docker daemon at {address} went away and did not answer again within "
            f"{waited:.0f} s (--daemon_wait); start dockerd, then rerun (cached entries are kept)"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (DaemonGone, (self.address, self.waited))


class DaemonInterrupted(CacheError):
    """The Docker daemon went away in the middle of an entry: the entry starts again once the
    daemon is back, without counting as a failed attempt (what it had made is thrown away)."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"the Docker daemon went away during the entry ({detail})")

    def __reduce__(self) -> tuple[object, ...]:
        return (DaemonInterrupted, (self.detail,))


class NoDaemonFound(SetupError):
    """No Docker daemon address at all: DOCKER_HOST unset and no socket where Docker puts one."""

    def __init__(self, looked_at: list[str]) -> None:
        self.looked_at = looked_at
        super().__init__(
            f"no Docker daemon found: DOCKER_HOST is not set and there is no socket at "
            f"{', '.join(looked_at)}; start dockerd or set DOCKER_HOST, or use "
            "--backend registry, which needs no daemon"
        )


class ImageNotFound(CacheError):
    """The image does not exist in its registry (or locally with --skip_pull)."""

    def __init__(self, image: str, detail: str = "") -> None:
        self.image = image
        hint = f": {detail}" if detail else ""
        super().__init__(f"image {image} not found{hint}")


class PullFailed(CacheError):
    """A pull failed for a reason that retrying may fix (network, registry 5xx)."""

    transient = True

    def __init__(self, image: str, detail: str) -> None:
        self.image = image
        super().__init__(f"pull of {image} failed: {detail}")


class TlsFailed(PullFailed):
    """The registry's TLS handshake or certificate was refused; retrying will not fix it."""

    transient = False


class Unauthorized(CacheError):
    """The registry refused our credentials (or asked for some)."""

    def __init__(self, image: str, detail: str) -> None:
        self.image = image
        super().__init__(
            f"pull of {image} unauthorized: {detail}; run `docker login` for its registry"
        )


class RateLimited(CacheError):
    """The registry's pull quota is spent (HTTP 429 / toomanyrequests)."""

    transient = True

    def __init__(self, image: str, detail: str, retry_after: float | None = None) -> None:
        self.image = image
        self.retry_after = retry_after
        super().__init__(f"pull of {image} rate limited: {detail}")


class NoTestbed(CacheError):
    """The image has no /testbed (or the requested path)."""

    def __init__(self, image: str, path: str) -> None:
        self.image = image
        super().__init__(f"image {image} has no {path}")


class TransferFailed(CacheError):
    """Streaming the archive out of the container failed or timed out; retryable."""

    transient = True


class UnsafeArchive(CacheError):
    """The tar stream holds a member that would write outside its folder, or is malformed."""

    def __init__(self, member: str, reason: str) -> None:
        self.member = member
        self.reason = reason
        super().__init__(f"unsafe archive member {member!r}: {reason}")


class TruncatedArchive(CacheError):
    """The tar stream ended before its end-of-archive marker or mid-member."""

    transient = True


class LimitExceeded(CacheError):
    """An entry needs more work than its limits allow (a decompression bomb, a flood of members)."""

    def __init__(self, what: str, option: str, limit: int) -> None:
        self.what = what
        self.option = option
        self.limit = limit
        super().__init__(
            f"refused: more than {what} (--{option} {limit}); "
            f"raise --{option} if the image is genuine"
        )

    def __reduce__(self) -> tuple[type[LimitExceeded], tuple[str, str, int]]:
        # travels back from a worker process as itself
        return (LimitExceeded, (self.what, self.option, self.limit))


class DiskFull(CacheError):
    """No space left on the cache folder's filesystem."""

    retry_later = True


class IndexCorrupt(CacheError):
    """index.json cannot be read as an index."""


class RateLimitExhausted(CacheError):
    """The registry's rate limit did not lift within the allowed wait."""

    retry_later = True

    def __init__(self, image: str, waited: float) -> None:
        self.image = image
        super().__init__(
            f"pull of {image} gave up: the registry's rate limit did not lift in {waited:.0f} s; "
            "log in with `docker login` (Docker Hub allows more pulls to accounts) or set a "
            "registry mirror (dockerd --registry-mirror), then rerun"
        )


class InvalidReference(CacheError):
    """An image reference that Docker would not parse."""

    def __init__(self, image: str, reason: str) -> None:
        self.image = image
        super().__init__(f"malformed image reference {image!r}: {reason}")


class CredentialsWithheld(CacheError):
    """A token service over plain HTTP on a host not trusted for it: credentials are not sent."""

    def __init__(self, image: str, realm: str, host: str) -> None:
        self.image = image
        super().__init__(
            f"pull of {image} stopped: its token service {realm} is plain HTTP, so the "
            f"registry credentials are not sent to it; pass --insecure_registry {host} if you "
            "trust that host"
        )


class RegistryError(CacheError):
    """The registry answered something this client cannot use (bad manifest, unknown type)."""

    def __init__(self, image: str, detail: str) -> None:
        self.image = image
        super().__init__(f"registry answer for {image} unusable: {detail}")


class DigestMismatch(CacheError):
    """A manifest or blob does not hash to the digest it was asked by; nothing is kept."""

    def __init__(self, image: str, expected: str, detail: str) -> None:
        self.image = image
        self.expected = expected
        super().__init__(f"content of {expected} in {image} does not match its digest: {detail}")


class MissingInstance(KeyError, CacheError):
    """An instance id that the cache does not hold (or whose folder is gone)."""

    def __init__(self, instance_id: str, cache_dir: Path, detail: str = "") -> None:
        self.instance_id = instance_id
        self.cache_dir = cache_dir
        self.message = detail or f"instance {instance_id!r} is not in the cache at {cache_dir}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class EnsureFailed(CacheError):
    """An instance could not be extracted into the cache; ``reason`` says why."""

    def __init__(self, instance_id: str, reason: str) -> None:
        self.instance_id = instance_id
        self.reason = reason
        super().__init__(f"cannot cache {instance_id}: {reason}")


class CheckoutError(CacheError):
    """A checkout cannot be made or released."""


class GitGuardFailed(CacheError):
    """A repository's history past HEAD could not be removed; nothing of it is published."""

    def __init__(self, where: str, detail: str) -> None:
        self.where = where
        self.detail = detail
        super().__init__(
            f"cannot remove the git history past HEAD from {where}: {detail}; "
            "--keep_git_history keeps .git as the image has it"
        )
