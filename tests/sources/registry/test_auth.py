"""Registry auth: challenges, tokens fetched once and renewed, credentials only where due."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import anyio
import pytest

from asynccache.entries import Entry
from asynccache.errors import (
    CredentialsWithheld,
    InvalidEntry,
    InvalidReference,
    RegistryError,
    Unauthorized,
)
from asynccache.sources.credentials import Credentials
from asynccache.sources.registry.auth import parse_www_authenticate
from tests.support.fake_registry import (
    FakeRegistry,
    backend,
    entry_for,
    extract,
    fake_registry,
    non_loopback_address,
    sample_image,
    serving,
)


def test_www_authenticate_bearer_and_basic() -> None:
    (bearer,) = parse_www_authenticate(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/ubuntu:pull"'
    )
    assert bearer.scheme == "bearer"
    assert bearer.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/ubuntu:pull",
    }
    (basic,) = parse_www_authenticate('Basic realm="Registry Realm"')
    assert basic == type(basic)("basic", {"realm": "Registry Realm"})


def test_www_authenticate_quoting_and_several_challenges() -> None:
    found = parse_www_authenticate(
        'Bearer realm="https://a/t",scope="repository:x:pull,push",error="insufficient_scope", '
        'Basic realm="say \\"hi\\"", Negotiate'
    )
    assert [c.scheme for c in found] == ["bearer", "basic", "negotiate"]
    assert found[0].params["scope"] == "repository:x:pull,push"
    assert found[0].params["error"] == "insufficient_scope"
    assert found[1].params["realm"] == 'say "hi"'
    assert parse_www_authenticate("") == []
    (unquoted,) = parse_www_authenticate("Bearer realm=https://r/t, service=svc")
    assert unquoted.params == {"realm": "https://r/t", "service": "svc"}


@pytest.mark.anyio
async def test_bearer_tokens_are_fetched_once_and_reused(tmp_path: Path) -> None:
    registry = FakeRegistry()
    registry.add("proj/app", "v1", sample_image("one"))
    registry.add("proj/app", "v2", sample_image("two"))
    async with fake_registry(registry) as host, backend(tmp_path) as source:
        async with anyio.create_task_group() as tg:
            for tag in ("v1", "v2"):
                tg.start_soon(extract, source, f"{host}/proj/app:{tag}", tmp_path / tag)
        assert await extract(source, f"{host}/proj/app:v1", tmp_path / "again") == {
            "a.txt": "a-one",
            "c.txt": "c",
        }
    assert registry.counts["token"] == 1
    assert registry.token_auth == [None]
    # the base layer once (it holds no /testbed); v1's own layer twice (noted, then kept when
    # v1 came again); v2's once; the last layer, which both share, once or twice (kept when the
    # second extraction was already waiting for it as the first began)
    assert registry.counts["GET blobs"] in (5, 6)
    assert registry.counts["GET manifests"] == 2


@pytest.mark.anyio
async def test_expired_tokens_are_renewed(tmp_path: Path) -> None:
    registry = FakeRegistry(token_lifetime=1)
    registry.add("proj/app", "v1", sample_image())
    async with fake_registry(registry) as host, backend(tmp_path, layer_cache_bytes=0) as source:
        await extract(source, f"{host}/proj/app:v1", tmp_path / "one")
        first = registry.counts["token"]
        await anyio.sleep(0.6)
        source.layers.untouched.clear()
        await source.after_extraction(entry_for(f"{host}/proj/app:v1"))
        await extract(source, f"{host}/proj/app:v1", tmp_path / "two")
    assert first == 1
    assert registry.counts["token"] == 2


@pytest.mark.anyio
async def test_credentials_go_to_the_token_service_and_basic_registries(tmp_path: Path) -> None:
    registry = FakeRegistry()
    registry.add("proj/app", "v1", sample_image())
    creds = {"username": "me", "password": "secret"}
    async with fake_registry(registry) as host:
        async with backend(tmp_path, credentials=lambda image: creds) as source:
            await extract(source, f"{host}/proj/app:v1", tmp_path / "bearer")
        expected = "Basic " + base64.b64encode(b"me:secret").decode()
        assert registry.token_auth == [expected]
        registry.auth, registry.users = "basic", {"me": "secret"}
        async with backend(tmp_path, credentials=lambda image: creds) as source:
            assert await extract(source, f"{host}/proj/app:v1", tmp_path / "basic") == {
                "a.txt": "a-one",
                "c.txt": "c",
            }
        async with backend(tmp_path) as source:
            with pytest.raises(Unauthorized, match="asks for a login"):
                await extract(source, f"{host}/proj/app:v1", tmp_path / "anonymous")


@pytest.mark.anyio
async def test_401_after_auth_is_unauthorized(tmp_path: Path) -> None:
    registry = FakeRegistry(accept_tokens=False)
    registry.add("proj/app", "v1", sample_image())
    async with fake_registry(registry) as host, backend(tmp_path) as source:
        with pytest.raises(Unauthorized, match="authentication required"):
            await extract(source, f"{host}/proj/app:v1", tmp_path / "d")


# --- credentials go only to the registry they belong to ---------------------------------------


class Lookups:
    """A credentials lookup giving the same answer for every registry, remembering each ask."""

    def __init__(self, creds: Credentials | None) -> None:
        self.creds = creds
        self.asked: list[str] = []

    def __call__(self, registry: str) -> Credentials | None:
        self.asked.append(registry)
        return self.creds


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.anyio
async def test_credentials_are_looked_up_for_the_registry_of_the_reference(tmp_path: Path) -> None:
    registry = FakeRegistry()
    registry.add("proj/app", "v1", sample_image())
    lookups = Lookups({"username": "me", "password": "secret"})
    async with fake_registry(registry) as host, backend(tmp_path, credentials=lookups) as source:
        await extract(source, f"{host}/proj/app:v1", tmp_path / "d")
    assert lookups.asked == [host]
    assert registry.token_auth == [basic("me", "secret")]


@pytest.mark.anyio
async def test_a_docker_hub_mirror_asks_its_own_credentials_then_docker_hubs(
    tmp_path: Path,
) -> None:
    registry = FakeRegistry()
    registry.add("library/sample", "latest", sample_image("hub"))
    lookups = Lookups(None)
    async with (
        fake_registry(registry) as host,
        backend(tmp_path, registry_mirror=f"http://{host}", credentials=lookups) as source,
    ):
        await extract(source, "sample", tmp_path / "a")
    assert lookups.asked == [host, "docker.io"]


@pytest.mark.anyio
@pytest.mark.parametrize("image", ["LOCALHOST/x:1", "Evil/img:1"])
async def test_an_upper_case_first_component_is_refused_before_any_credentials(
    tmp_path: Path, image: str
) -> None:
    # An Entry cannot even hold such a reference; the backend refuses it on its own too.
    with pytest.raises(InvalidEntry, match="must be lowercase"):
        Entry("x__0", "x", image, "0" * 40)
    lookups = Lookups({"username": "hub-user", "password": "hub-secret"})
    async with backend(tmp_path, credentials=lookups) as source:
        with pytest.raises(InvalidReference, match="must be lowercase"):
            await source.manifest(image)
    assert lookups.asked == []


@pytest.mark.anyio
async def test_docker_hub_credentials_in_the_docker_config_never_reach_another_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = FakeRegistry()
    registry.add("proj/app", "v1", sample_image())
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    hub = {"https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:s3cret").decode()}}
    monkeypatch.setenv("DOCKER_CONFIG", str(config.parent))
    async with fake_registry(registry) as host:
        config.write_text(json.dumps({"auths": hub}))
        async with backend(tmp_path, credentials=None) as source:
            await extract(source, f"{host}/proj/app:v1", tmp_path / "hub-only")
        own = {host: {"auth": base64.b64encode(b"local:pw").decode()}}
        config.write_text(json.dumps({"auths": {**hub, **own}}))
        async with backend(tmp_path, credentials=None) as source:
            await extract(source, f"{host}/proj/app:v1", tmp_path / "own")
    assert registry.token_auth == [None, basic("local", "pw")]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "creds", [{"username": "me", "password": "secret"}, {"identitytoken": "refresh-me"}]
)
async def test_no_credentials_to_a_plain_http_token_service_that_is_not_trusted(
    tmp_path: Path, creds: dict[str, str]
) -> None:
    token_service = FakeRegistry()
    registry = FakeRegistry(issued=token_service.issued)
    registry.add("proj/app", "v1", sample_image())
    address = non_loopback_address()
    async with (
        serving(token_service.handle, host=address) as token_base,
        fake_registry(registry) as host,
    ):
        realm_host = token_base.removeprefix("http://")
        registry.realm = f"{token_base}/token"
        image = f"{host}/proj/app:v1"
        async with backend(tmp_path, credentials=lambda registry: creds) as source:
            advice = re.escape(f"pass --insecure_registry {realm_host}")
            with pytest.raises(CredentialsWithheld, match=advice) as withheld:
                await extract(source, image, tmp_path / "withheld")
        assert "plain HTTP" in str(withheld.value)
        assert token_service.token_requests == []
        # Anonymous pulls still get their token there: nothing secret travels.
        async with backend(tmp_path) as source:
            await extract(source, image, tmp_path / "anonymous")
        assert token_service.token_auth == [None]
        # Named by --insecure_registry, the token service is trusted with the credentials.
        trusted = backend(
            tmp_path, credentials=lambda registry: creds, insecure_registries=[realm_host]
        )
        async with trusted as source:
            await extract(source, image, tmp_path / "trusted")
    method, body = token_service.token_requests[-1]
    if "identitytoken" in creds:
        assert method == "POST" and b"refresh_token=refresh-me" in body
    else:
        assert token_service.token_auth[-1] == basic("me", "secret")


@pytest.mark.anyio
async def test_a_refresh_token_post_is_not_replayed_to_another_origin(tmp_path: Path) -> None:
    elsewhere = FakeRegistry()
    registry = FakeRegistry()
    registry.add("proj/app", "v1", sample_image())
    creds = {"identitytoken": "refresh-me"}
    async with serving(elsewhere.handle) as other, fake_registry(registry) as host:
        registry.redirect_token_to = f"{other}/token"
        async with backend(tmp_path, credentials=lambda registry: creds) as source:
            with pytest.raises(RegistryError, match="another origin"):
                await extract(source, f"{host}/proj/app:v1", tmp_path / "elsewhere")
        assert elsewhere.token_requests == []
        # Within the token service's own origin the redirect is followed, form and all.
        registry.redirect_token_to = f"{registry.base}/token-moved"
        async with backend(tmp_path, credentials=lambda registry: creds) as source:
            await extract(source, f"{host}/proj/app:v1", tmp_path / "moved")
    method, body = registry.token_requests[-1]
    assert method == "POST" and b"refresh_token=refresh-me" in body
