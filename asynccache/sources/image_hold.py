"""When the Docker source removes the images it pulled: the newest of each repository waits."""

from __future__ import annotations

from asynccache.reference import parse_reference


class RepositoryHold:
    """Which pulled images to remove when, keeping the newest image of each repository.

    Images of one repository share their base layers: the newest finished image of a
    repository stays until the next one of that repository is done, so the pulls in between
    find the shared layers present. The rest go at the end of the run.
    """

    def __init__(self) -> None:
        self._held: dict[str, str] = {}

    def done_with(self, image: str) -> str | None:
        """Hold ``image`` for its repository; return the older image it replaces, if any."""
        repository = parse_reference(image).name
        previous = self._held.get(repository)
        self._held[repository] = image
        return previous if previous != image else None

    def drain(self) -> list[str]:
        """Every image still held (the run is over)."""
        images = list(self._held.values())
        self._held.clear()
        return images
