"""Tests for network endpoints as capability resources (sdk/endpoints.py): the grammar of
`net.connect@HOST:PORT`, its matching, and the subset rule delegation relies on."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.access.rules import Capability, rule_covers
from sdk import endpoints
from sdk.syscalls import known_op
from sdk.tokens import Rule

CONNECT = "net.connect"


def rule(text: str) -> Rule:
    return Rule.parse(f"{CONNECT}@{text}")


@pytest.mark.parametrize(("grant", "target", "allowed"), [
    ("api.example.org:443", "api.example.org:443", True),
    ("api.example.org:443", "v2.api.example.org:443", False),  # a name is not its subdomains
    ("api.example.org:443", "api.example.org:80", False),
    ("*.example.org:443", "api.example.org:443", True),
    ("*.example.org:443", "a.b.example.org:443", True),
    ("*.example.org:443", "example.org:443", False),
    ("*.example.org:443", "badexample.org:443", False),
    ("*.example.org:*", "api.example.org:8443", True),
    ("*:443", "anything.net:443", True),
    ("*:443", "203.0.113.9:443", True),
    ("10.0.0.0/8:22", "10.9.8.7:22", True),
    ("10.0.0.0/8:22", "11.0.0.1:22", False),
    ("127.0.0.1:8000", "127.0.0.1:8000", True),
    ("[fd00::/8]:443", "[fd12::1]:443", True),
    ("[::1]:80", "127.0.0.1:80", False),
    ("*.0.0.org:1", "10.0.0.org:1", True),  # a name, not an address: its last label is not numeric
])
def test_grants_match_exactly_what_they_name(grant: str, target: str, allowed: bool) -> None:
    host, port = endpoints.split(target)
    request = endpoints.resource(endpoints.canonical_host(host), int(port))
    assert rule(grant).matches(CONNECT, request) is allowed


@pytest.mark.parametrize("bad", [
    "2130706433:80", "0x7f.1:80", "10.0.0.1/8:80", "a.b:0", "a.b:65536", "a.b", "a.b:08",
    "*.1.2:80", "a*b.org:1", "[1.2.3.4]:5", "::1:80", "exa mple.org:1", "ex\u00e4mple.org:1",
    "-a.org:1", "[::0001]:1", "a..b:1",
])
def test_malformed_endpoints_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        rule(bad)


def test_the_shorthand_is_the_net_resource_and_a_known_right() -> None:
    assert rule("API.Example.org:443") == Rule(CONNECT, "net/api.example.org:443")
    assert known_op(CONNECT) and known_op("net.*") and not known_op("net.listen")
    assert Rule.parse("net.connect@*") == Rule(CONNECT, "*")


def test_delegation_narrows_and_never_widens() -> None:
    wide, narrow = rule("*.example.org:443"), rule("api.example.org:443")
    assert rule_covers(wide, narrow) and not rule_covers(narrow, wide)
    assert rule_covers(wide, rule("*.api.example.org:443"))
    assert not rule_covers(wide, rule("*.example.org:*"))
    assert not rule_covers(rule("*:443"), rule("*:*"))
    assert rule_covers(rule("10.0.0.0/8:*"), rule("10.1.0.0/16:80"))
    assert not rule_covers(rule("10.1.0.0/16:80"), rule("10.0.0.0/8:80"))
    assert rule_covers(Rule(CONNECT, "net/"), wide) and rule_covers(Rule(CONNECT), wide)


def test_only_an_ip_grant_is_explicit() -> None:
    loopback = ipaddress.ip_address("127.0.0.1")
    assert endpoints.explicit_ip("127.0.0.1:80", loopback, 80)
    assert endpoints.explicit_ip("127.0.0.0/8:*", loopback, 80)
    assert not endpoints.explicit_ip("127.0.0.1:81", loopback, 80)
    assert not endpoints.explicit_ip("localhost:80", loopback, 80)
    assert not endpoints.explicit_ip("*:80", loopback, 80)


_LABEL = st.sampled_from(["a", "b", "api", "x1"])
_NAME = st.lists(_LABEL, min_size=1, max_size=3).map(lambda ls: ".".join([*ls, "org"]))
_HOST = st.one_of(_NAME, _NAME.map(lambda n: "*." + n), st.just("*"),
                  st.sampled_from(["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3", "192.0.2.1"]))
_PATTERN = st.tuples(_HOST, st.sampled_from(["80", "443", "*"])).map(":".join)
_TARGET = st.tuples(st.one_of(_NAME, st.sampled_from(["10.1.2.3", "10.2.0.1", "192.0.2.1"])),
                    st.sampled_from(["80", "443"])).map(":".join)


@settings(max_examples=300, deadline=None)
@given(parent=_PATTERN, child=_PATTERN, target=_TARGET)
def test_covers_is_the_subset_relation(parent: str, child: str, target: str) -> None:
    """A grant a parent covers never allows a connection the parent does not."""
    p, c, t = rule(parent), rule(child), f"net/{target}"
    if rule_covers(p, c) and c.matches(CONNECT, t):
        assert p.matches(CONNECT, t)
    assert rule_covers(p, p)


@pytest.mark.parametrize(("address", "is_public"), [
    ("8.8.8.8", True), ("2606:4700::1111", True), ("::ffff:8.8.8.8", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("100.64.0.1", False), ("169.254.169.254", False),
    ("0.0.0.0", False), ("224.0.0.1", False), ("::1", False), ("fe80::1", False),
    ("fd00::1", False), ("::ffff:127.0.0.1", False), ("64:ff9b::7f00:1", False),
    ("2002:7f00:1::", False), ("2002:0808:0808::", True),
])
def test_only_global_unicast_addresses_are_public(address: str, is_public: bool) -> None:
    assert endpoints.public(ipaddress.ip_address(address)) is is_public


def _cap(*rule_sets: list[str]) -> Capability:
    caveats = tuple(("allow", tuple(Rule.parse(t) for t in rules)) for rules in rule_sets)
    return Capability("0" * 32, None, "agent:1", 0.0, caveats)


def test_a_local_address_needs_every_rule_set_to_allow_it_and_one_to_name_it() -> None:
    local = ipaddress.ip_address("10.0.0.1")
    # A narrowing that names the address under a parent's `*`: granted by IP.
    assert _cap(["*"], ["net.connect@10.0.0.1:443"]).names_ip(CONNECT, local, 443)
    # Wildcards and names never count as naming it.
    assert not _cap(["net.connect@*:443"]).names_ip(CONNECT, local, 443)
    assert not _cap(["net.connect"]).names_ip(CONNECT, local, 443)
    # A holder of *.evil.org that appends a set naming 10/8 cannot widen its token with it.
    assert not _cap(["net.connect@*.evil.org:443"],
                    ["net.connect@x.evil.org:443", "net.connect@10.0.0.0/8:*"],
                    ).names_ip(CONNECT, local, 443)
