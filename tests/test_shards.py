"""Shards: ``--shard K/N`` and ``auto`` parsing, and the partition of a split's rows."""

from __future__ import annotations

import random

import pytest

from asynccache.errors import SetupError
from asynccache.shards import (
    SHARD_COUNT_VAR,
    Shard,
    ShardError,
    parse_shard,
    partition,
    shard_from_environment,
    shard_positions,
    shard_size,
)

# --- --shard K/N ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0/1", Shard(0, 1)), ("3/16", Shard(3, 16)), (" 15 / 16 ", Shard(15, 16))],
)
def test_parse_k_of_n(text: str, expected: Shard) -> None:
    assert parse_shard(text, {}) == expected


@pytest.mark.parametrize("text", ["16/16", "4/3", "3/0", "-1/4", "3", "a/b", "", "1/2/3", "1.0/2"])
def test_parse_rejects_malformed_with_one_line(text: str) -> None:
    with pytest.raises(ShardError) as caught:
        parse_shard(text, {})
    message = str(caught.value)
    assert message.startswith("--shard ")
    assert "K/N" in message and "\n" not in message
    assert isinstance(caught.value, SetupError)  # a usage error: exit code 2


def test_shard_names_itself() -> None:
    shard = Shard(3, 16)
    assert str(shard) == "3/16"
    assert shard.label == "shard 3/16"


# --- --shard auto -------------------------------------------------------------------------------


def slurm(task: int, low: int, high: int, count: int | None = None) -> dict[str, str]:
    env = {
        "SLURM_ARRAY_TASK_ID": str(task),
        "SLURM_ARRAY_TASK_MIN": str(low),
        "SLURM_ARRAY_TASK_MAX": str(high),
    }
    if count is not None:
        env["SLURM_ARRAY_TASK_COUNT"] = str(count)
    return env


def test_auto_slurm_array_from_zero() -> None:
    assert parse_shard("auto", slurm(3, 0, 15, 16)) == Shard(3, 16)


def test_auto_slurm_array_from_one_counts_from_its_first_id() -> None:
    assert parse_shard("auto", slurm(1, 1, 16, 16)) == Shard(0, 16)
    assert parse_shard("auto", slurm(16, 1, 16, 16)) == Shard(15, 16)


def test_auto_slurm_min_max_without_count() -> None:
    assert parse_shard("auto", slurm(2, 0, 3)) == Shard(2, 4)


def test_auto_slurm_count_without_min_max() -> None:
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "8"}
    assert parse_shard("auto", env) == Shard(5, 8)


def test_auto_slurm_array_with_gaps_needs_the_count() -> None:
    # sbatch --array=3,7: re-running two shards of sixteen.
    env = slurm(7, 3, 7, 2)
    with pytest.raises(ShardError, match=SHARD_COUNT_VAR):
        parse_shard("auto", env)
    assert parse_shard("auto", {**env, SHARD_COUNT_VAR: "16"}) == Shard(7, 16)


def test_auto_slurm_array_with_a_step_needs_the_count() -> None:
    env = {**slurm(4, 0, 6, 4), "SLURM_ARRAY_TASK_STEP": "2"}
    with pytest.raises(ShardError, match=SHARD_COUNT_VAR):
        parse_shard("auto", env)


def test_auto_kubernetes_indexed_job() -> None:
    env = {"JOB_COMPLETION_INDEX": "2", SHARD_COUNT_VAR: "4"}
    assert parse_shard("auto", env) == Shard(2, 4)


def test_auto_kubernetes_without_count_names_the_variable() -> None:
    with pytest.raises(ShardError) as caught:
        parse_shard("AUTO", {"JOB_COMPLETION_INDEX": "2"})
    assert SHARD_COUNT_VAR in str(caught.value)
    assert "JOB_COMPLETION_INDEX=2" in str(caught.value)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({}, "not a Slurm array task"),
        ({SHARD_COUNT_VAR: "4"}, "neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX"),
        ({SHARD_COUNT_VAR: "0", "JOB_COMPLETION_INDEX": "0"}, "must be at least 1"),
        ({SHARD_COUNT_VAR: "four", "JOB_COMPLETION_INDEX": "0"}, "not a whole number"),
        ({SHARD_COUNT_VAR: "4", "JOB_COMPLETION_INDEX": "4"}, "is not below"),
        ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"}, "not a whole number"),
        ({"SLURM_ARRAY_TASK_ID": "3"}, "without SLURM_ARRAY_TASK_COUNT"),
        ({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "4"}, "outside the array"),
        (
            {SHARD_COUNT_VAR: "4", "SLURM_ARRAY_TASK_ID": "1", "JOB_COMPLETION_INDEX": "2"},
            "disagree",
        ),
    ],
)
def test_auto_says_in_one_line_why_it_cannot_tell(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ShardError) as caught:
        shard_from_environment(env)
    message = str(caught.value)
    assert needle in message
    assert message.startswith("--shard auto: ") and "\n" not in message


# --- the partition ------------------------------------------------------------------------------


def random_groups(rng: random.Random) -> list[str]:
    """Rows of a few repositories of very different sizes, interleaved as a dataset may be."""
    repos = [f"repo{r}" for r in range(rng.randint(1, 12))]
    weights = [rng.choice([1, 2, 5, 20, 100]) for _ in repos]
    return rng.choices(repos, weights=weights, k=rng.randint(0, 400))


def pieces(groups: list[str], shards: list[list[int]]) -> int:
    """How many (repository, shard) pairs hold rows: the repository count when none is cut."""
    return len({(groups[p], k) for k, positions in enumerate(shards) for p in positions})


@pytest.mark.parametrize("seed", range(300))
def test_partition_covers_once_balanced_and_keeps_repositories_together(seed: int) -> None:
    rng = random.Random(seed)
    groups = random_groups(rng)
    count = rng.randint(1, 20)
    shards = partition(groups, count)

    assert len(shards) == count
    positions = [p for shard in shards for p in shard]
    assert sorted(positions) == list(range(len(groups)))  # every row exactly once
    base, extra = divmod(len(groups), count)
    assert [len(s) for s in shards] == [base + (k < extra) for k in range(count)]
    assert all(shard == sorted(shard) for shard in shards)  # dataset order within a shard
    # Each cut fills a shard completely, so there are fewer cuts than shards.
    assert pieces(groups, shards) <= len(set(groups)) + count - 1
    # Deterministic: every task computes the same partition, and shard_positions agrees.
    assert partition(list(groups), count) == shards
    assert [shard_positions(groups, Shard(k, count)) for k in range(count)] == shards
    assert [shard_size(len(groups), Shard(k, count)) for k in range(count)] == list(
        map(len, shards)
    )


def test_partition_cuts_no_repository_when_the_sizes_allow() -> None:
    # A contiguous cut of the rows sorted by repository would cut "b" (a a b b | b c c d).
    groups = ["a", "b", "c", "a", "b", "c", "b", "d"]
    shards = partition(groups, 2)
    assert pieces(groups, shards) == 4
    assert sorted(len(s) for s in shards) == [4, 4]


def test_partition_of_equal_repositories_gives_one_each() -> None:
    groups = [f"repo{i % 4}" for i in range(40)]
    shards = partition(groups, 4)
    assert [len({groups[p] for p in shard}) for shard in shards] == [1, 1, 1, 1]


def test_partition_cuts_a_large_repository_into_few_pieces() -> None:
    # One repository of 4,000 rows over 16 shards with 578 rows of 30 small ones beside it.
    rng = random.Random(7)
    groups = ["big"] * 4000 + [f"small{rng.randrange(30)}" for _ in range(578)]
    rng.shuffle(groups)
    shards = partition(groups, 16)
    assert {len(s) for s in shards} == {286, 287}
    big_shards = sum(1 for shard in shards if any(groups[p] == "big" for p in shard))
    assert big_shards == 14  # ceil(4000 / 287) = 14: as few as the room allows


def test_partition_with_more_shards_than_rows() -> None:
    shards = partition(["a", "a", "b"], 5)
    assert sorted(len(s) for s in shards) == [0, 0, 1, 1, 1]
    assert shards[0] and shards[1] and shards[2]


def test_partition_needs_a_shard() -> None:
    with pytest.raises(ValueError):
        partition(["a"], 0)
