"""The closing line of a run's registry traffic: apart, so that a pool can log its workers' sum
without loading the HTTP stack into the main process."""

from __future__ import annotations

__all__ = ["totals_line"]


def totals_line(totals: dict[str, int], testbed_path: str) -> str:
    """The closing log line of a run's registry traffic (one backend's, or a pool's sum)."""
    return (
        f"registry backend: {totals.get('bytes', 0)} bytes downloaded; layers fetched "
        f"{totals.get('fetched', 0)}, from cache {totals.get('cached', 0)}, skipped as holding "
        f"no {testbed_path} {totals.get('skipped', 0)}"
    )
