"""The egress proxy's request parsing (kernel/doors/egress.py), fed hostile heads: every bad
request is a `Refused` with the status the client sees, never an exception of another kind."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.doors.egress import Refused, parse_head, parse_target, proxy_token


@pytest.mark.parametrize(("method", "target", "expect"), [
    ("CONNECT", "API.Example.org.:443", ("api.example.org", 443, "")),
    ("CONNECT", "[::1]:8443", ("::1", 8443, "")),
    ("CONNECT", "203.0.113.7:22", ("203.0.113.7", 22, "")),
    ("GET", "http://Example.ORG./a/b?q=1", ("example.org", 80, "/a/b?q=1")),
    ("POST", "http://[2001:db8::1]:8080", ("2001:db8::1", 8080, "/")),
])
def test_targets_are_canonical(method: str, target: str, expect: tuple) -> None:
    assert parse_target(method, target) == expect


@pytest.mark.parametrize(("method", "target"), [
    ("CONNECT", "example.org"), ("CONNECT", "example.org:0"), ("CONNECT", "example.org:99999"),
    ("CONNECT", "0x7f.1:80"), ("CONNECT", "2130706433:80"), ("CONNECT", "[::1:80"),
    ("CONNECT", "ex ample.org:80"), ("GET", "/relative"), ("GET", "https://example.org/"),
    ("GET", "http://user:pw@example.org/"), ("GET", "ftp://example.org/"),
    ("GET", "http://example.org:x/"),
])
def test_bad_targets_are_400(method: str, target: str) -> None:
    with pytest.raises(Refused) as caught:
        parse_target(method, target)
    assert caught.value.status == 400


def test_https_in_a_plain_request_points_to_connect() -> None:
    with pytest.raises(Refused, match="HTTPS_PROXY"):
        parse_target("GET", "https://example.org/")


def test_proxy_credentials() -> None:
    def basic(text: str) -> list[tuple[str, str]]:
        return [("Proxy-Authorization", "Basic " + base64.b64encode(text.encode()).decode())]

    assert proxy_token(basic("agent:aos1.tok")) == "aos1.tok"
    assert proxy_token(basic("aos1.tok:")) == "aos1.tok"
    assert proxy_token([("proxy-authorization", "Bearer aos1.tok")]) == "aos1.tok"
    assert proxy_token([("Host", "x")]) is None
    for bad in ("Basic !!!", "Digest x", "Basic " + base64.b64encode(b"\xff").decode()):
        with pytest.raises(Refused) as caught:
            proxy_token([("Proxy-Authorization", bad)])
        assert caught.value.status == 407


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_head_parses_or_is_refused(head: bytes) -> None:
    try:
        method, target, headers = parse_head(head + b"\r\n\r\n")
        parse_target(method, target)
        proxy_token(headers)
    except Refused as exc:
        assert exc.status in (400, 407)
