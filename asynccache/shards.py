"""Shards: which part of a split one task of an array job caches (pure: no I/O).

``--shard K/N`` names shard K (0-based) of N; ``--shard auto`` reads K and N from the scheduler's
environment (a Slurm array task, or a Kubernetes Indexed Job with :data:`SHARD_COUNT_VAR`). The
partition depends only on the rows' repository names in dataset order, so every task computes the
same one: it covers every row exactly once, gives each shard ``M // N`` or ``M // N + 1`` rows, and
keeps the rows of one repository in one shard as far as that balance allows (they share base
layers, so one shard pulls those once).
"""

from __future__ import annotations

import re
from bisect import bisect_left, insort
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from asynccache.errors import SetupError

#: The shard count of ``--shard auto`` where the scheduler does not give it (Kubernetes), or
#: where its own would be wrong (re-running some tasks of a Slurm array: ``--array=3,7``).
SHARD_COUNT_VAR = "ASYNCCACHE_SHARD_COUNT"

_SPEC = re.compile(r"^\s*(\d{1,9})\s*/\s*(\d{1,9})\s*$")
_INTEGER = re.compile(r"^\s*(\d{1,9})\s*$")
_USAGE = "expected K/N with 0 <= K < N (e.g. 3/16), or auto"


class ShardError(SetupError):
    """``--shard`` is malformed, or ``auto`` cannot tell the shard from the environment."""


@dataclass(frozen=True, order=True)
class Shard:
    """Shard ``index`` (0-based) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ShardError(f"--shard {self.index}/{self.count}: {_USAGE}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def label(self) -> str:
        """How progress lines and summaries name it: ``shard 3/16``."""
        return f"shard {self.index}/{self.count}"


def parse_shard(text: str, environ: Mapping[str, str]) -> Shard:
    """``K/N`` or ``auto`` (read from ``environ``, normally ``os.environ``) as a Shard."""
    if text.strip().lower() == "auto":
        return shard_from_environment(environ)
    match = _SPEC.match(text)
    if match is None:
        raise ShardError(f"--shard {text!r}: {_USAGE}")
    return Shard(int(match.group(1)), int(match.group(2)))


def shard_from_environment(environ: Mapping[str, str]) -> Shard:
    """The shard of this task from a scheduler's variables, or ShardError saying what is missing.

    With :data:`SHARD_COUNT_VAR` set, K is the task's own index (``SLURM_ARRAY_TASK_ID`` or
    ``JOB_COMPLETION_INDEX``, numbered from 0). Without it, a Slurm array gives both: K is the
    task id less the array's first id and N its task count, provided the ids are consecutive.
    """
    slurm_id = environ.get("SLURM_ARRAY_TASK_ID", "").strip()
    job_index = environ.get("JOB_COMPLETION_INDEX", "").strip()
    count_text = environ.get(SHARD_COUNT_VAR, "").strip()
    if count_text:
        count = _integer(SHARD_COUNT_VAR, count_text)
        if count < 1:
            raise ShardError(f"--shard auto: {SHARD_COUNT_VAR}={count_text} must be at least 1")
        if slurm_id and job_index and slurm_id != job_index:
            raise ShardError(
                f"--shard auto: SLURM_ARRAY_TASK_ID={slurm_id} and JOB_COMPLETION_INDEX="
                f"{job_index} disagree; pass --shard K/N"
            )
        name, value = (
            ("JOB_COMPLETION_INDEX", job_index) if job_index else ("SLURM_ARRAY_TASK_ID", slurm_id)
        )
        if not value:
            raise ShardError(
                f"--shard auto: {SHARD_COUNT_VAR} is set but neither SLURM_ARRAY_TASK_ID nor "
                "JOB_COMPLETION_INDEX is; run as an array task or pass --shard K/N"
            )
        index = _integer(name, value)
        if index >= count:
            raise ShardError(
                f"--shard auto: {name}={index} is not below {SHARD_COUNT_VAR}={count}; "
                "number the tasks from 0 to N-1"
            )
        return Shard(index, count)
    if slurm_id:
        return _slurm_shard(environ, _integer("SLURM_ARRAY_TASK_ID", slurm_id))
    if job_index:
        raise ShardError(
            f"--shard auto: JOB_COMPLETION_INDEX={job_index} but no shard count; set "
            f"{SHARD_COUNT_VAR} to the Job's completions"
        )
    raise ShardError(
        "--shard auto: not a Slurm array task (no SLURM_ARRAY_TASK_ID) nor a Kubernetes "
        f"Indexed Job task (no JOB_COMPLETION_INDEX with {SHARD_COUNT_VAR}); pass --shard K/N"
    )


def _slurm_shard(environ: Mapping[str, str], task_id: int) -> Shard:
    def read(name: str) -> int | None:
        value = environ.get(name, "").strip()
        return _integer(name, value) if value else None

    count = read("SLURM_ARRAY_TASK_COUNT")
    low = read("SLURM_ARRAY_TASK_MIN")
    high = read("SLURM_ARRAY_TASK_MAX")
    step = read("SLURM_ARRAY_TASK_STEP")
    if low is not None and high is not None:
        span = high - low + 1
        if count is None:
            count = span
        if count != span or (step is not None and step != 1):
            raise ShardError(
                f"--shard auto: the Slurm array's ids {low}-{high} are not {count} consecutive "
                f"ids, so the shard count is unknown; set {SHARD_COUNT_VAR}=N (task ids 0..N-1)"
            )
    if count is None:
        raise ShardError(
            "--shard auto: SLURM_ARRAY_TASK_ID is set without SLURM_ARRAY_TASK_COUNT or "
            f"SLURM_ARRAY_TASK_MIN/MAX; set {SHARD_COUNT_VAR}=N or pass --shard K/N"
        )
    index = task_id - (low or 0)
    if not 0 <= index < count:
        raise ShardError(
            f"--shard auto: SLURM_ARRAY_TASK_ID={task_id} is outside the array's {count} tasks; "
            f"set {SHARD_COUNT_VAR}=N (task ids 0..N-1) or pass --shard K/N"
        )
    return Shard(index, count)


def _integer(name: str, value: str) -> int:
    match = _INTEGER.match(value)
    if match is None:
        raise ShardError(f"--shard auto: {name}={value!r} is not a whole number")
    return int(match.group(1))


def partition(groups: Sequence[str], count: int) -> list[list[int]]:
    """Split positions ``0..len(groups)-1`` into ``count`` shards, each in ascending order.

    ``groups[i]`` is the repository of row ``i``. Shard k holds ``M // N + 1`` rows for
    ``k < M % N`` and ``M // N`` after. Repositories are placed largest first (ties by name):
    whole into the fullest shard they fit in, else the emptiest shard is filled with the
    repository's first rows and the rest placed again, so a repository is cut only when no
    shard has room for it and then into as few pieces as the free room allows.
    """
    if count < 1:
        raise ValueError("a partition needs at least one shard")
    base, extra = divmod(len(groups), count)
    members: dict[str, list[int]] = {}
    for position, group in enumerate(groups):
        members.setdefault(group, []).append(position)
    # Free room of every shard, as (room, shard) kept sorted: best fit and emptiest by bisection.
    rooms = sorted((base + (1 if shard < extra else 0), shard) for shard in range(count))
    shards: list[list[int]] = [[] for _ in range(count)]
    for group in sorted(members, key=lambda name: (-len(members[name]), name)):
        pending = members[group]
        while pending:
            slot = bisect_left(rooms, (len(pending), -1))
            if slot == len(rooms):
                slot = len(rooms) - 1
            room, shard = rooms.pop(slot)
            taken = min(room, len(pending))
            shards[shard].extend(pending[:taken])
            pending = pending[taken:]
            if room > taken:
                insort(rooms, (room - taken, shard))
    for positions in shards:
        positions.sort()
    return shards


def shard_size(rows: int, shard: Shard) -> int:
    """How many of ``rows`` rows the partition gives ``shard`` (known before reading them)."""
    base, extra = divmod(rows, shard.count)
    return base + (1 if shard.index < extra else 0)


def shard_positions(groups: Sequence[str], shard: Shard) -> list[int]:
    """The positions (ascending) of the rows that belong to ``shard``."""
    return partition(groups, shard.count)[shard.index]
