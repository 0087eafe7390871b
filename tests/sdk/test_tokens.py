"""Tests for the token format (sdk.tokens) and the kernel's authority and rules: tampering,
attenuation and rule coverage."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import itertools
import math

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel.access.rules import Capability, rule_covers, rules_cover
from kernel.access.tokens import TokenAuthority
from sdk.tokens import (
    MAX_CAVEATS,
    MAX_TOKEN_CHARS,
    Rule,
    TokenError,
    attenuate,
    decode_caveat,
    encode_caveat,
    op_matches,
    parse_unverified,
    resource_matches,
)
from tests.conftest import DEEP

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW = 1_700_000_000.0
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unpack(token: str) -> list:
    """Decode a token by hand, independently of the module, following the documented format."""
    assert token.startswith("aos1.")
    body = token[5:]
    return msgspec.msgpack.decode(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def pack(parts: list) -> str:
    return "aos1." + b64(msgspec.msgpack.encode(parts))


def sample_token(auth: TokenAuthority | None = None) -> str:
    auth = auth or TokenAuthority(KEY)
    token = auth.mint(
        "agent:7",
        [Rule.parse("ipc.send@ipc/bob"), Rule.parse("sys.*")],
        expires_at=NOW + 60,
        not_before=NOW - 60,
    )
    return attenuate(token, ("allow", [["ipc.*", None], ["sys.null", None]]))


def assert_rejected(auth: TokenAuthority, token: object) -> TokenError:
    with pytest.raises(TokenError) as info:
        auth.verify(token)  # type: ignore[arg-type]
    assert info.value.reason
    return info.value


# --------------------------------------------------------------------------- Rule


@pytest.mark.parametrize(
    "text",
    [
        "*",
        "sys.*",
        "ipc.send",
        "ipc.send@ipc/bob",
        "ipc.*@ipc/",
        "*@*",
        "fs.read@fs/data/x.txt",
        "fs.read@fs/a@b",
        "proc_2.kill_9@proc/7",
    ],
)
def test_rule_parse_accepts_and_round_trips(text: str) -> None:
    rule = Rule.parse(text)
    assert str(rule) == text
    assert Rule.parse(str(rule)) == rule


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ipc",
        "ipc.",
        ".send",
        "IPC.send",
        "ipc.send.x",
        "ipc.*.x",
        "*.send",
        "ipc.send@",
        "ipc.send@ipc//bob",
        "ipc.send@/ipc",
        "ipc.send@ipc/./bob",
        "ipc.send@ipc/../bob",
        "ipc.send@..",
        "ipc.send@ipc/ bob",
        "ipc.send@ipc/\tbob",
        "ipc.send@ipc/\x00",
        "ipc.send@ipc/*",
        "ipc.send@ipc//",
        "ipc.send@/",
        "ipc.send@" + "a" * 257,
        "ipc.send\n",
    ],
)
def test_rule_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        Rule.parse(text)


def test_rule_constructor_validates_too() -> None:
    with pytest.raises(ValueError):
        Rule("not an op")
    with pytest.raises(ValueError):
        Rule("ipc.send", 7)  # type: ignore[arg-type]
    assert Rule("ipc.send", "a" * 256).resource == "a" * 256


def test_op_and_resource_matching() -> None:
    assert op_matches("*", "ipc.send")
    assert op_matches("ipc.*", "ipc.send")
    assert not op_matches("ipc.*", "ipcx.send")
    assert op_matches("ipc.send", "ipc.send")
    assert not op_matches("ipc.send", "ipc.sendx")
    assert resource_matches("ipc/bob", "ipc/bob")
    assert resource_matches("ipc/bob", "ipc/bob/inbox")
    assert not resource_matches("ipc/bob", "ipc/bobby")
    assert not resource_matches("ipc/bob", "ipc")
    assert resource_matches("ipc/", "ipc/bob")
    assert not resource_matches("ipc/", "ipc")
    assert not resource_matches("ipc/", "ipcx/bob")
    assert resource_matches("*", "anything/at/all")


def test_rule_with_resource_never_matches_request_without() -> None:
    assert not Rule("ipc.send", "*").matches("ipc.send", None)
    assert Rule("ipc.send").matches("ipc.send", None)
    assert Rule("ipc.send").matches("ipc.send", "ipc/bob")


# --------------------------------------------------------------------- coverage vs brute force

FIXED_OPS = ["*", "ipc.*", "sys.*", "ipc.send", "ipc.recv", "sys.null", "fs.read"]
FIXED_RESOURCES = [
    None,
    "*",
    "ipc",
    "ipc/",
    "ipc/bob",
    "ipc/bob/",
    "ipc/bobby",
    "ipc/bob/inbox",
    "proc/",
    "proc/7",
    "fs/data/x.txt",
]


def witness_universe(rules: list[Rule]) -> list[tuple[str, str | None]]:
    """Requests rich enough that brute-force coverage is exact for these rules.

    If a child rule c is not covered by parent p, this request satisfies c but not p:
    op = c.op itself when exact, "fam.zz" for "fam.*", "zz.zz" for "*" (names no pattern uses);
    resource = None when c.resource is None, "zzz" for "*", otherwise c.resource itself (every
    resource under a prefix starts with that prefix, and the prefix is itself under it).
    Extra near-miss strings are added so soundness is probed beyond the witnesses.
    """
    ops = {"zz.zz"}
    resources: set[str | None] = {None, "zzz", "*", ""}
    for rule in rules:
        if rule.op != "*":
            family, name = rule.op.split(".")
            ops.add(f"{family}.zz")
            if name != "*":
                ops.add(rule.op)
                ops.add(rule.op + "x")
        if rule.resource is not None and rule.resource != "*":
            base = rule.resource.rstrip("/")
            resources.update({rule.resource, base, base + "/", base + "z", base + "/zz"})
            resources.add(base.rsplit("/", 1)[0])
    return [(op, res) for op in sorted(ops) for res in resources]


def satisfied(rules: list[Rule], universe: list[tuple[str, str | None]]) -> frozenset:
    return frozenset(req for req in universe if any(r.matches(*req) for r in rules))


def test_rule_covers_exhaustive_over_fixed_alphabet() -> None:
    rules = [Rule(op, res) for op in FIXED_OPS for res in FIXED_RESOURCES]
    universe = witness_universe(rules)
    sets = {rule: satisfied([rule], universe) for rule in rules}
    for parent, child in itertools.product(rules, rules):
        assert rule_covers(parent, child) == (sets[child] <= sets[parent]), (parent, child)
    # Spot-check the cases people get wrong.
    assert not rule_covers(Rule("*", "ipc/bob"), Rule("*", "ipc/bobby"))
    assert rule_covers(Rule("*", "ipc/bob"), Rule("*", "ipc/bob/"))
    assert not rule_covers(Rule("*", "ipc/bob/"), Rule("*", "ipc/bob"))
    assert not rule_covers(Rule("*", "*"), Rule("*"))
    assert rule_covers(Rule("*"), Rule("*", "*"))
    assert not rule_covers(Rule("ipc.send"), Rule("ipc.*"))


SEGMENTS = st.sampled_from(["a", "b", "ab", "ba"])
RESOURCE_PREFIXES = st.one_of(
    st.none(),
    st.just("*"),
    st.builds(
        lambda segs, slash: "/".join(segs) + ("/" if slash else ""),
        st.lists(SEGMENTS, min_size=1, max_size=3),
        st.booleans(),
    ),
)
OP_PATTERNS = st.one_of(
    st.just("*"),
    st.builds("{}.*".format, st.sampled_from(["f", "g", "fg"])),
    st.builds("{}.{}".format, st.sampled_from(["f", "g", "fg"]), st.sampled_from(["x", "y"])),
)
RULES = st.builds(Rule, OP_PATTERNS, RESOURCE_PREFIXES)


@FAST
@given(RULES, RULES)
def test_rule_covers_matches_brute_force(parent: Rule, child: Rule) -> None:
    universe = witness_universe([parent, child])
    brute = satisfied([child], universe) <= satisfied([parent], universe)
    assert rule_covers(parent, child) == brute


@FAST
@given(st.lists(RULES, max_size=4), st.lists(RULES, max_size=4))
def test_rules_cover_matches_brute_force(parents: list[Rule], children: list[Rule]) -> None:
    # Resource prefixes form trees, so a union of parents covers a child only if one parent does;
    # the brute force over unions therefore agrees with the per-rule definition.
    universe = witness_universe(parents + children)
    brute = satisfied(children, universe) <= satisfied(parents, universe)
    assert rules_cover(parents, children) == brute


@FAST
@given(
    RULES,
    RULES,
    st.sampled_from(["f.x", "f.y", "g.x", "fg.x", "f.z", "h.x"]),
    st.one_of(st.none(), st.text(alphabet="ab/z*", max_size=8)),
)
def test_rule_covers_sound_for_arbitrary_requests(
    parent: Rule, child: Rule, op: str, resource: str | None
) -> None:
    if rule_covers(parent, child) and child.matches(op, resource):
        assert parent.matches(op, resource)


# --------------------------------------------------------------------------- mint / verify / check


def test_mint_verify_round_trip_and_check() -> None:
    auth = TokenAuthority(KEY)
    token = auth.mint(
        "agent:7",
        [Rule.parse("ipc.send@ipc/bob"), Rule.parse("sys.*")],
        expires_at=NOW + 60,
        parent_id="ab" * 16,
    )
    assert token.startswith("aos1.") and len(token) <= MAX_TOKEN_CHARS
    cap = auth.verify(token)
    assert isinstance(cap, Capability)
    assert cap.subject == "agent:7" and cap.parent_id == "ab" * 16
    assert len(cap.token_id) == 32 and int(cap.token_id, 16) >= 0
    assert [kind for kind, _ in cap.caveats] == ["aud", "allow", "exp"]
    assert cap.audiences == ("agent:7",)
    assert cap.expires_at == NOW + 60 and cap.not_before is None
    assert cap.rule_sets == ((Rule("ipc.send", "ipc/bob"), Rule("sys.*")),)

    def check(op: str, res: str | None, who: str = "agent:7", now: float = NOW) -> str | None:
        return cap.check(op, res, who, now)

    assert check("ipc.send", "ipc/bob") is None
    assert check("ipc.send", "ipc/bob/inbox") is None
    assert check("sys.null", None) is None
    assert check("sys.null", "proc/7") is None
    assert "not allowed" in (check("ipc.send", "ipc/bobby") or "")
    assert "not allowed" in (check("ipc.send", None) or "")
    assert "not allowed" in (check("ipc.recv", "ipc/bob") or "")
    assert check("ipc.send", "ipc/bob/../alice") == "malformed resource"
    assert check("ipc.send", "ipc/bob/") == "malformed resource"
    assert check("ipc", "ipc/bob") == "malformed op"
    assert check("ipc.send", "ipc/bob", who="agent:8") == "audience mismatch"
    assert check("ipc.send", "ipc/bob", now=NOW + 60) == "expired"
    assert check("ipc.send", "ipc/bob", now=NOW + 59.9) is None


def test_token_format_is_as_documented() -> None:
    auth = TokenAuthority(KEY)
    token = auth.mint("agent:7", [Rule("*")], audience="agent:9")
    key_id, identifier, caveats, sig = unpack(token)
    assert key_id == hashlib.sha256(KEY).digest()[:8] == auth.key_id
    ident = msgspec.msgpack.decode(identifier)
    assert set(ident) == {"tid", "parent", "sub", "iat"}
    assert ident["sub"] == "agent:7" and ident["parent"] is None
    assert [msgspec.msgpack.decode(c) for c in caveats] == [
        ["aud", "agent:9"],
        ["allow", [["*", None]]],
    ]
    expected = hmac.digest(KEY, b"agentos-token-v1\0" + identifier, "sha256")
    for caveat in caveats:
        expected = hmac.digest(expected, caveat, "sha256")
    assert sig == expected


def test_mint_defaults_and_validation() -> None:
    auth = TokenAuthority(KEY)
    cap = auth.verify(auth.mint("user:0", []))
    assert cap.audiences == ("user:0",)
    assert cap.check("sys.null", None, "user:0", NOW) == "not allowed: sys.null"
    cap = auth.verify(auth.mint("user:0", [Rule("*")], not_before=NOW))
    assert [k for k, _ in cap.caveats] == ["aud", "allow", "nbf"]
    for bad in [
        {"subject": ""},
        {"subject": "agent 7"},
        {"audience": 7},
        {"expires_at": math.nan},
        {"not_before": math.inf},
        {"expires_at": True},
        {"parent_id": "nothex"},
        {"rules": ["ipc.send"]},
        {"rules": [Rule("*", "a" * 200)] * 50},
    ]:
        kwargs = {"subject": "agent:7", "rules": [Rule("*")], **bad}
        with pytest.raises(ValueError):
            auth.mint(**kwargs)  # type: ignore[arg-type]
    for key in [b"short", b"x" * 33, "k" * 32]:
        with pytest.raises(ValueError):
            TokenAuthority(key)  # type: ignore[arg-type]


def test_expiry_and_not_before_with_explicit_now() -> None:
    auth = TokenAuthority(KEY)
    cap = auth.verify(auth.mint("agent:1", [Rule("*")], expires_at=NOW + 10, not_before=NOW - 10))
    assert cap.check("sys.null", None, "agent:1", NOW - 10.001) == "not yet valid"
    assert cap.check("sys.null", None, "agent:1", NOW - 10) is None
    assert cap.check("sys.null", None, "agent:1", NOW + 9.999) is None
    assert cap.check("sys.null", None, "agent:1", NOW + 10) == "expired"
    # Attenuating with a later expiry cannot extend the earlier one.
    short = auth.mint("agent:1", [Rule("*")], expires_at=NOW)
    later = auth.verify(attenuate(short, ("exp", NOW * 2)))
    assert later.expires_at == NOW
    assert later.check("sys.null", None, "agent:1", NOW + 1) == "expired"


def test_audience_mismatch_and_explicit_audience() -> None:
    auth = TokenAuthority(KEY)
    cap = auth.verify(auth.mint("agent:1", [Rule("*")], audience="agent:2"))
    assert cap.check("sys.null", None, "agent:1", NOW) == "audience mismatch"
    assert cap.check("sys.null", None, "agent:2", NOW) is None
    # Two different audiences can never both hold.
    both = auth.verify(attenuate(auth.mint("agent:1", [Rule("*")]), ("aud", "agent:3")))
    assert both.audiences == ("agent:1", "agent:3")
    assert both.check("sys.null", None, "agent:1", NOW) == "audience mismatch"
    assert both.check("sys.null", None, "agent:3", NOW) == "audience mismatch"


def test_unknown_caveat_kind_is_preserved_and_fails_closed() -> None:
    auth = TokenAuthority(KEY)
    token = attenuate(auth.mint("agent:1", [Rule("*")]), ("quota", {"usd": 5}))
    cap = auth.verify(token)
    assert cap.caveats[-1] == ("quota", {"usd": 5})
    assert cap.check("sys.null", None, "agent:1", NOW) == "unknown caveat 'quota'"
    # Re-encoding the parsed caveats reproduces the same bytes.
    assert unpack(attenuate(token))[2] == [encode_caveat(k, v) for k, v in cap.caveats]


def test_encode_decode_caveat_validation() -> None:
    assert decode_caveat(encode_caveat("exp", 5)) == ("exp", 5.0)
    assert decode_caveat(encode_caveat("allow", [Rule("ipc.*", "ipc/")])) == (
        "allow",
        (Rule("ipc.*", "ipc/"),),
    )
    for kind, value in [
        ("aud", 7),
        ("aud", ""),
        ("allow", "ipc.send"),
        ("allow", [["ipc.send"]]),
        ("allow", [["ipc.send", 5]]),
        ("allow", [["ipc.send", "a//b"]]),
        ("allow", [["IPC", None]]),
        ("exp", "soon"),
        ("exp", False),
        ("nbf", math.nan),
        ("exp", 10**400),
        ("Bad-Kind", 1),
        ("x", object()),
        ("x", 10**30),
    ]:
        with pytest.raises(ValueError):
            encode_caveat(kind, value)
    for data in [
        msgspec.msgpack.encode(["exp", "soon"]),
        msgspec.msgpack.encode(["exp", True]),
        msgspec.msgpack.encode(["allow", [["ipc.send", None, 1]]]),
        msgspec.msgpack.encode(["aud"]),
        msgspec.msgpack.encode(["aud", "a", "b"]),
        msgspec.msgpack.encode([1, "a"]),
        msgspec.msgpack.encode({"aud": "a"}),
        b"\x92",
        b"\x91" * 100_000,
        b"\x92\xa1\x80\x01",  # invalid UTF-8 in the kind
    ]:
        with pytest.raises(TokenError):
            decode_caveat(data)


# --------------------------------------------------------------------------- tampering


def test_other_key_is_refused_as_unknown_key() -> None:
    token = TokenAuthority(OTHER_KEY).mint("agent:1", [Rule("*")])
    assert assert_rejected(TokenAuthority(KEY), token).reason == "unknown key"


def test_every_single_bit_flip_is_rejected() -> None:
    auth = TokenAuthority(KEY)
    token = sample_token(auth)
    auth.verify(token)  # cached: the cache must not let any neighbour through
    raw = bytearray(base64.urlsafe_b64decode(token[5:] + "=" * (-len(token[5:]) % 4)))
    for bit in range(len(raw) * 8):
        raw[bit // 8] ^= 1 << (bit % 8)
        assert_rejected(auth, "aos1." + b64(bytes(raw)))
        raw[bit // 8] ^= 1 << (bit % 8)
    assert auth.verify(token) is auth.verify(token)


@FAST
@given(
    st.lists(RULES, min_size=1, max_size=3),
    st.lists(st.tuples(st.sampled_from(["exp", "nbf"]), st.floats(0, 2e9)), max_size=3),
    st.data(),
)
def test_random_tokens_reject_bit_flips(
    rules: list[Rule], extra: list, data: st.DataObject
) -> None:
    auth = TokenAuthority(KEY)
    token = attenuate(auth.mint("agent:1", rules), *extra)
    auth.verify(token)
    raw = bytearray(base64.urlsafe_b64decode(token[5:] + "=" * (-len(token[5:]) % 4)))
    for bit in data.draw(st.lists(st.integers(0, len(raw) * 8 - 1), min_size=1, max_size=20)):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert_rejected(auth, "aos1." + b64(bytes(flipped)))


def test_every_truncation_is_rejected() -> None:
    auth = TokenAuthority(KEY)
    token = sample_token(auth)
    auth.verify(token)
    for end in range(len(token)):
        assert_rejected(auth, token[:end])


def test_non_canonical_spellings_are_rejected() -> None:
    auth = TokenAuthority(KEY)
    token = sample_token(auth)
    body = token[5:]
    padded = token + "=" * (-len(body) % 4)
    if padded != token:
        assert_rejected(auth, padded)
    assert_rejected(auth, "AOS1." + body)
    assert_rejected(auth, token + "\n")
    assert_rejected(auth, " " + token)
    # The last character carries unused low bits when len(body) % 4 != 0; set them.
    if len(body) % 4:
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        last = alphabet.index(body[-1])
        twin = "aos1." + body[:-1] + alphabet[last | 1]
        if twin != token:
            assert_rejected(auth, twin)
    # Same parts re-encoded with a wider-than-needed msgpack header.
    parts = unpack(token)
    raw = msgspec.msgpack.encode(parts)
    assert raw[0] == 0x94
    assert_rejected(auth, "aos1." + b64(b"\xdc\x00\x04" + raw[1:]))
    assert_rejected(auth, pack([*parts, b""]))


def test_removing_reordering_or_swapping_caveats_is_rejected() -> None:
    auth = TokenAuthority(KEY)
    token = sample_token(auth)
    key_id, identifier, caveats, sig = unpack(token)
    assert len(set(caveats)) == len(caveats) == 5
    for i in range(len(caveats)):
        assert_rejected(auth, pack([key_id, identifier, caveats[:i] + caveats[i + 1 :], sig]))
    for perm in itertools.permutations(range(len(caveats))):
        if list(perm) != sorted(perm):
            assert_rejected(auth, pack([key_id, identifier, [caveats[i] for i in perm], sig]))
    other_sig = unpack(sample_token(auth))[3]
    assert_rejected(auth, pack([key_id, identifier, caveats, other_sig]))
    # The parent token's signature cannot stand in for the attenuated one, nor vice versa.
    parent = auth.mint("agent:7", [Rule("*")])
    child = attenuate(parent, ("allow", [["sys.null", None]]))
    pk, pi, pc, _ = unpack(parent)
    _, _, cc, cs = unpack(child)
    assert_rejected(auth, pack([pk, pi, pc, cs]))
    assert_rejected(auth, pack([pk, pi, cc, unpack(parent)[3]]))


def test_invalid_utf8_in_identifier_is_a_token_error() -> None:
    token = pack([b"12345678", b"\x81\xa1\x80\x01", [], bytes(32)])
    with pytest.raises(TokenError):
        parse_unverified(token)
    assert_rejected(TokenAuthority(KEY), token)


@FAST
@given(st.sampled_from(range(5)), st.sampled_from(range(32)))
def test_caveat_substitution_is_rejected(index: int, byte: int) -> None:
    auth = TokenAuthority(KEY)
    key_id, identifier, caveats, sig = unpack(sample_token(auth))
    replaced = list(caveats)
    replaced[index] = encode_caveat("allow", [["*", None]])
    assert_rejected(auth, pack([key_id, identifier, replaced, sig]))
    forged = bytearray(sig)
    forged[byte] ^= 0x80
    assert_rejected(auth, pack([key_id, identifier, caveats, bytes(forged)]))


def test_limits() -> None:
    auth = TokenAuthority(KEY)
    token = auth.mint("agent:1", [Rule("*")])
    token = attenuate(token, *[("exp", NOW + i) for i in range(MAX_CAVEATS - 2)])
    assert len(auth.verify(token).caveats) == MAX_CAVEATS
    with pytest.raises(TokenError):
        attenuate(token, ("exp", NOW))
    parts = unpack(token)
    assert_rejected(auth, pack([*parts[:2], [*parts[2], parts[2][-1]], parts[3]]))
    assert assert_rejected(auth, "aos1." + "A" * MAX_TOKEN_CHARS).reason == "token too long"
    big = auth.mint("agent:1", [Rule("*", "a" * 200)] * 10)
    with pytest.raises(TokenError):
        attenuate(big, *[("allow", [["*", "a" * 250]] * 10)] * 3)


def test_verify_cache_is_bounded_and_exact() -> None:
    auth = TokenAuthority(KEY)
    token = auth.mint("agent:1", [Rule("*")])
    first = auth.verify(token)
    assert auth.verify(token) is first
    for _ in range(5000):
        auth.verify(attenuate(token, ("exp", NOW)))
    assert len(auth._cache) <= 4096
    assert auth.verify(token) == first


# --------------------------------------------------------------------------- attenuation


PRINCIPALS = ["agent:1", "agent:2"]
REQUEST_OPS = ["f.x", "f.y", "g.x", "fg.y", "h.x"]
REQUEST_RESOURCES = [None, "a", "a/b", "ab", "b/a", "a/b/ab", "ba/a"]
CAVEATS = st.one_of(
    st.tuples(st.just("allow"), st.lists(RULES, max_size=3)),
    st.tuples(st.just("aud"), st.sampled_from(PRINCIPALS)),
    st.tuples(st.sampled_from(["exp", "nbf"]), st.sampled_from([NOW - 5, NOW, NOW + 5])),
    st.tuples(st.just("quota"), st.integers(0, 5)),
    st.tuples(st.just("budget"), st.tuples(st.sampled_from(["calls", "bytes"]),
                                           st.integers(0, 5), st.just("0123456789abcdef"))),
    st.tuples(st.just("once"), st.just("0123456789abcdef" * 2)),
    st.tuples(st.just("requires_approval"), st.lists(RULES, max_size=2)),
)


@FAST
@given(
    st.lists(RULES, max_size=4),
    st.sampled_from(PRINCIPALS),
    st.lists(CAVEATS, min_size=1, max_size=4),
)
def test_attenuation_never_widens(rules: list[Rule], subject: str, extra: list) -> None:
    auth = TokenAuthority(KEY)
    parent_token = auth.mint(subject, rules, expires_at=NOW + 3)
    child_token = attenuate(parent_token, *extra)
    parent, child = auth.verify(parent_token), auth.verify(child_token)
    assert child.token_id == parent.token_id
    assert child.caveats[: len(parent.caveats)] == parent.caveats
    assert len(child.caveats) == len(parent.caveats) + len(extra)
    for op, res, who, now in itertools.product(
        REQUEST_OPS, REQUEST_RESOURCES, PRINCIPALS, [NOW - 5, NOW, NOW + 5]
    ):
        if child.check(op, res, who, now) is None:
            assert parent.check(op, res, who, now) is None


def test_attenuate_rejects_bad_input() -> None:
    token = TokenAuthority(KEY).mint("agent:1", [Rule("*")])
    with pytest.raises(ValueError):
        attenuate(token, ("exp",))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        attenuate(token, ("allow", [["nope", None]]))
    with pytest.raises(TokenError):
        attenuate(token[:-3], ("exp", NOW))
    assert parse_unverified(attenuate(token, ("exp", NOW))).expires_at == NOW


# --------------------------------------------------------------------------- garbage


MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)


def only_token_errors(token: object) -> None:
    auth = TokenAuthority(KEY)
    for call in (auth.verify, parse_unverified):
        try:
            call(token)  # type: ignore[arg-type]
        except TokenError as exc:
            assert exc.reason
    with contextlib.suppress(TokenError):
        attenuate(token, ("exp", NOW))  # type: ignore[arg-type]


@settings(max_examples=500 * DEEP, deadline=None)
@given(st.one_of(st.text(), st.binary(), st.builds("aos1.{}".format, st.text()), st.integers()))
def test_garbage_raises_only_token_error(token: object) -> None:
    only_token_errors(token)


@settings(max_examples=500 * DEEP, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        MSGPACK_VALUES.map(msgspec.msgpack.encode),
        st.tuples(
            st.sampled_from([hashlib.sha256(KEY).digest()[:8], b"12345678"]),
            st.one_of(st.binary(max_size=60), MSGPACK_VALUES.map(msgspec.msgpack.encode)),
            st.lists(
                st.one_of(st.binary(max_size=20), MSGPACK_VALUES.map(msgspec.msgpack.encode)),
                max_size=4,
            ),
            st.binary(min_size=32, max_size=32),
        ).map(msgspec.msgpack.encode),
    )
)
def test_structured_garbage_raises_only_token_error(raw: bytes) -> None:
    only_token_errors("aos1." + b64(raw))


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "tid": st.text(max_size=40) | st.just("ab" * 16),
            "parent": st.none() | st.text(max_size=3),
        },
        optional={"sub": MSGPACK_VALUES, "iat": MSGPACK_VALUES, "x": MSGPACK_VALUES},
    ),
    st.lists(
        st.tuples(st.text(max_size=6), MSGPACK_VALUES).map(msgspec.msgpack.encode), max_size=3
    ),
)
def test_forged_identifiers_and_caveats_parse_strictly(ident: dict, caveats: list) -> None:
    # parse_unverified skips the MAC, so this drives the identifier and caveat decoders directly.
    token = pack([b"12345678", msgspec.msgpack.encode(ident), caveats, bytes(32)])
    only_token_errors(token)
