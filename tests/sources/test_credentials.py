"""Registry credentials are found as the docker CLI finds them."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from asynccache.errors import InvalidReference
from asynccache.sources.credentials import credentials_for, registry_auth_header, registry_of


@pytest.mark.parametrize(
    ("image", "registry"),
    [
        ("namanjain12/aiohttp_final:abc", "docker.io"),
        ("ubuntu", "docker.io"),
        ("127.0.0.1:5000/a/b:c", "127.0.0.1:5000"),
        ("localhost/a", "localhost"),
        ("ghcr.io/org/img:1", "ghcr.io"),
        ("index.docker.io/library/ubuntu", "docker.io"),
    ],
)
def test_registry_is_parsed_as_docker_does(image: str, registry: str) -> None:
    assert registry_of(image) == registry


def _config(tmp_path: Path, data: dict[str, object]) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


def test_docker_hub_image_uses_the_index_key_not_the_first_path_segment(tmp_path: Path) -> None:
    auth = base64.b64encode(b"naman:s3cret").decode()
    path = _config(tmp_path, {"auths": {"https://index.docker.io/v1/": {"auth": auth}}})
    creds = credentials_for("namanjain12/aiohttp_final:abc", path)
    assert creds == {
        "username": "naman",
        "password": "s3cret",
        "serveraddress": "https://index.docker.io/v1/",
    }
    header = registry_auth_header("namanjain12/aiohttp_final:abc", path)
    assert header is not None
    assert json.loads(base64.urlsafe_b64decode(header))["username"] == "naman"


def test_no_config_means_anonymous(tmp_path: Path) -> None:
    assert credentials_for("ubuntu", tmp_path / "absent.json") is None


def _helper(tmp_path: Path, name: str, user: str) -> None:
    script = tmp_path / "bin" / f"docker-credential-{name}"
    script.parent.mkdir(exist_ok=True)
    script.write_text(
        "#!/bin/sh\nread server\n"
        f'echo "{{\\"ServerURL\\": \\"$server\\", \\"Username\\": \\"{user}\\", '
        '\\"Secret\\": \\"tok-$server\\"}"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_cred_helper_wins_over_store_and_auths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _helper(tmp_path, "per-registry", "helper-user")
    _helper(tmp_path, "store", "store-user")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    path = _config(
        tmp_path,
        {
            "credsStore": "store",
            "credHelpers": {"ghcr.io": "per-registry"},
            "auths": {"ghcr.io": {"auth": base64.b64encode(b"a:b").decode()}},
        },
    )
    assert credentials_for("ghcr.io/x/y", path) == {
        "username": "helper-user",
        "password": "tok-ghcr.io",
        "serveraddress": "ghcr.io",
    }
    hub = credentials_for("namanjain12/x", path)
    assert hub is not None
    assert hub["username"] == "store-user"
    assert hub["password"] == "tok-https://index.docker.io/v1/"


def _login(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize("image", ["LOCALHOST/x", "Evil/img:1", "Registry/x"])
def test_an_upper_case_first_component_gets_no_docker_hub_credentials(
    tmp_path: Path, image: str
) -> None:
    path = _config(tmp_path, {"auths": {"https://index.docker.io/v1/": _login("hub", "pw")}})
    with pytest.raises(InvalidReference, match="must be lowercase"):
        credentials_for(image, path)
    with pytest.raises(InvalidReference, match="must be lowercase"):
        registry_auth_header(image, path)


def test_each_registry_gets_its_own_credentials_and_no_others(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        {
            "auths": {
                "https://index.docker.io/v1/": _login("hub", "hub-pw"),
                "127.0.0.1:5000": _login("local", "local-pw"),
            }
        },
    )
    local = credentials_for("127.0.0.1:5000/a/b:c", path)
    assert local == {"username": "local", "password": "local-pw", "serveraddress": "127.0.0.1:5000"}
    header = registry_auth_header("127.0.0.1:5000/a/b:c", path)
    assert header is not None
    assert json.loads(base64.urlsafe_b64decode(header)) == local
    for elsewhere in ("localhost/a", "127.0.0.1:5001/a", "ghcr.io/o/r", "localhost:5000/a"):
        assert credentials_for(elsewhere, path) is None
        assert registry_auth_header(elsewhere, path) is None
    hub = credentials_for("docker.io/library/ubuntu", path)
    assert hub is not None and hub["username"] == "hub"
