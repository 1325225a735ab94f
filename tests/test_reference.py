"""The one image-reference grammar, checked against the cases of Docker's own reference tests."""

from __future__ import annotations

import pytest

from asynccache.entries import validate_image_reference
from asynccache.errors import InvalidReference
from asynccache.reference import Reference, parse_reference
from asynccache.sources.credentials import registry_of
from tests.support.fake_registry import ZERO

DIGEST = "sha256:dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c"
HEX64 = "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a"

# From distribution/reference normalize_test.go (TestValidateReferenceName, TestParseRepositoryInfo,
# TestNormalizedSplitHostname, TestParseAnyReference, TestParseReferenceWithTagAndDigest):
# the reference as written -> its fully qualified form.
DOCKER_VALID = [
    ("docker/docker", "docker.io/docker/docker"),
    ("library/debian", "docker.io/library/debian"),
    ("debian", "docker.io/library/debian"),
    ("docker.io/docker/docker", "docker.io/docker/docker"),
    ("docker.io/library/debian", "docker.io/library/debian"),
    ("docker.io/debian", "docker.io/library/debian"),
    ("index.docker.io/docker/docker", "docker.io/docker/docker"),
    ("index.docker.io/library/debian", "docker.io/library/debian"),
    ("index.docker.io/debian", "docker.io/library/debian"),
    ("127.0.0.1:5000/docker/docker", "127.0.0.1:5000/docker/docker"),
    ("127.0.0.1:5000/library/debian", "127.0.0.1:5000/library/debian"),
    ("127.0.0.1:5000/debian", "127.0.0.1:5000/debian"),
    ("192.168.0.1", "docker.io/library/192.168.0.1"),
    ("192.168.0.1:80", "docker.io/library/192.168.0.1:80"),
    ("192.168.0.1:8/debian", "192.168.0.1:8/debian"),
    ("192.168.0.2:25000/debian", "192.168.0.2:25000/debian"),
    (
        "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
        "docker.io/library/thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
    ),
    ("[fc00::1]:5000/docker", "[fc00::1]:5000/docker"),
    ("[fc00::1]:5000/docker/docker", "[fc00::1]:5000/docker/docker"),
    ("[fc00:1:2:3:4:5:6:7]:5000/library/debian", "[fc00:1:2:3:4:5:6:7]:5000/library/debian"),
    (f"docker.io/{HEX64}", f"docker.io/library/{HEX64}"),
    ("docker-rules/docker", "docker.io/docker-rules/docker"),
    ("docker---rules/docker", "docker.io/docker---rules/docker"),
    ("d/docker", "docker.io/d/docker"),
    ("jess/t", "docker.io/jess/t"),
    ("dock__er/docker", "docker.io/dock__er/docker"),
    ("fooo/bar", "docker.io/fooo/bar"),
    ("library/ubuntu", "docker.io/library/ubuntu"),
    ("nonlibrary/ubuntu", "docker.io/nonlibrary/ubuntu"),
    ("other/library", "docker.io/other/library"),
    ("127.0.0.1:8000/private/moonbase", "127.0.0.1:8000/private/moonbase"),
    ("127.0.0.1:8000/privatebase", "127.0.0.1:8000/privatebase"),
    ("example.com/private/moonbase", "example.com/private/moonbase"),
    ("example.com/privatebase", "example.com/privatebase"),
    ("example.com:8000/private/moonbase", "example.com:8000/private/moonbase"),
    ("ubuntu-12.04-base", "docker.io/library/ubuntu-12.04-base"),
    ("docker.io/foo", "docker.io/library/foo"),
    ("library/foo/bar", "docker.io/library/foo/bar"),
    ("store/foo/bar", "docker.io/store/foo/bar"),
    ("test.com/foo", "test.com/foo"),
    ("test_com/foo", "docker.io/test_com/foo"),
    ("test.com:8080/foo", "test.com:8080/foo"),
    ("test-com:8080/foo", "test-com:8080/foo"),
    ("xn--n3h.com/foo", "xn--n3h.com/foo"),
    ("xn--n3h.com:18080/foo", "xn--n3h.com:18080/foo"),
    ("docker.io/library/foo/bar", "docker.io/library/foo/bar"),
    ("redis:latest", "docker.io/library/redis:latest"),
    (f"redis@{DIGEST}", f"docker.io/library/redis@{DIGEST}"),
    ("dmcgowan/myapp:latest", "docker.io/dmcgowan/myapp:latest"),
    (f"dmcgowan/myapp@{DIGEST}", f"docker.io/dmcgowan/myapp@{DIGEST}"),
    (HEX64[:63], f"docker.io/library/{HEX64[:63]}"),
    ("dbcc1", "docker.io/library/dbcc1"),
    (f"busybox:latest@{DIGEST}", f"docker.io/library/busybox:latest@{DIGEST}"),
    ("localhost/x", "localhost/x"),
    ("localhost:5000/x", "localhost:5000/x"),
]

# From the same tests: references Docker refuses.
DOCKER_INVALID = [
    "https://github.com/docker/docker",
    "docker/Docker",
    "-docker",
    "-docker/docker",
    "-docker.io/docker/docker",
    "docker///docker",
    "docker.io/docker/Docker",
    "docker.io/docker///docker",
    "[fc00::1]",
    "[fc00::1]:5000",
    "fc00::1:5000/debian",
    "[fe80::1%eth0]:5000/debian",
    "[2001:db8:3:4::192.0.2.33]:5000/debian",
    HEX64,
    "docker-/docker",
    "-docker-/docker",
    "____/____",
    "_docker/_docker",
    "dock..er/docker",
    "dock_.er/docker",
    "dock-.er/docker",
    "docker/",
    "this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255_" * 4 + "/docker",
    "busybox:-foo",
    "busybox@foo",
]


@pytest.mark.parametrize(("image", "full"), DOCKER_VALID)
def test_references_docker_accepts_are_normalised_as_docker_does(image: str, full: str) -> None:
    assert str(parse_reference(image)) == full
    validate_image_reference(image)


@pytest.mark.parametrize("image", DOCKER_INVALID)
def test_references_docker_refuses_are_refused(image: str) -> None:
    with pytest.raises(InvalidReference):
        parse_reference(image)
    with pytest.raises(ValueError, match="malformed image reference"):
        validate_image_reference(image)


@pytest.mark.parametrize(
    "image", ["Docker/docker", "DOCKER/docker", "Foo/bar", "FOO/bar", "Evil/img", "LOCALHOST/x"]
)
def test_an_upper_case_first_component_names_no_host_and_is_refused(image: str) -> None:
    # A first component is a registry host only with a '.' or a ':' or as exactly 'localhost';
    # anything else is a Docker Hub path, where upper case is invalid. (Newer releases of
    # distribution/reference take such a component as a host; refusing it never sends a
    # request, or anybody's credentials, anywhere.)
    with pytest.raises(InvalidReference, match="must be lowercase"):
        parse_reference(image)
    with pytest.raises(ValueError, match="must be lowercase"):
        validate_image_reference(image)
    with pytest.raises(InvalidReference):
        registry_of(image)


def test_a_host_may_have_upper_case_letters_when_it_is_one() -> None:
    assert parse_reference("Registry.Example.com:5000/x") == Reference(
        "Registry.Example.com:5000", "x"
    )


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("namanjain12/x_final:abc", Reference("docker.io", "namanjain12/x_final", "abc")),
        ("ubuntu", Reference("docker.io", "library/ubuntu")),
        ("ubuntu:22.04", Reference("docker.io", "library/ubuntu", "22.04")),
        ("docker.io/library/ubuntu:1", Reference("docker.io", "library/ubuntu", "1")),
        ("index.docker.io/foo/bar", Reference("docker.io", "foo/bar")),
        ("docker.io/busybox", Reference("docker.io", "library/busybox")),
        ("127.0.0.1:5000/ns/x:t", Reference("127.0.0.1:5000", "ns/x", "t")),
        ("localhost/x", Reference("localhost", "x")),
        ("localhost:5000/a/b/c:v1.2-rc_3", Reference("localhost:5000", "a/b/c", "v1.2-rc_3")),
        ("ghcr.io/o/r@" + ZERO, Reference("ghcr.io", "o/r", None, ZERO)),
        ("ghcr.io/o/r:t@" + ZERO, Reference("ghcr.io", "o/r", "t", ZERO)),
        ("[::1]:5000/x:y", Reference("[::1]:5000", "x", "y")),
        ("a.b/c__d/e-f.g", Reference("a.b", "c__d/e-f.g")),
    ],
)
def test_references_parse_as_docker_does(image: str, expected: Reference) -> None:
    assert parse_reference(image) == expected


def test_reference_properties() -> None:
    hub = parse_reference("namanjain12/pandas_final:1234")
    assert hub.api_host == "registry-1.docker.io"
    assert hub.reference == "1234"
    assert parse_reference("ubuntu").reference == "latest"
    pinned = parse_reference("ghcr.io/o/r:t@" + ZERO)
    assert pinned.reference == ZERO and pinned.api_host == "ghcr.io"
    assert str(pinned) == "ghcr.io/o/r:t@" + ZERO


@pytest.mark.parametrize(
    "image",
    [
        *["", "UPPER", "x:bad tag", "a@sha256:zz", "a//b", "-x", "x/", "a:", " a"],
        *["x@md5:" + "0" * 32, "Registry/x", "x:t\u00e9", "x\n"],
    ],
)
def test_malformed_references_are_refused(image: str) -> None:
    with pytest.raises(InvalidReference):
        parse_reference(image)
