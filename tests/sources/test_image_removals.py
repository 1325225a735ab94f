"""Pulled images are removed so that images of one repository can share their base layers."""

from __future__ import annotations

from asynccache.sources.image_hold import RepositoryHold


def test_newest_image_of_a_repository_is_kept_until_the_next_one_is_done() -> None:
    hold = RepositoryHold()
    assert hold.done_with("127.0.0.1:5000/namanjain12/pandas_final:a1") is None
    assert hold.done_with("127.0.0.1:5000/namanjain12/numpy_final:b1") is None
    assert (
        hold.done_with("127.0.0.1:5000/namanjain12/pandas_final:a2")
        == "127.0.0.1:5000/namanjain12/pandas_final:a1"
    )
    assert hold.done_with("127.0.0.1:5000/namanjain12/pandas_final:a2") is None
    assert sorted(hold.drain()) == [
        "127.0.0.1:5000/namanjain12/numpy_final:b1",
        "127.0.0.1:5000/namanjain12/pandas_final:a2",
    ]
    assert hold.drain() == []
