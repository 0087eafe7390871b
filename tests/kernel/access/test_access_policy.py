"""Policy in one room (kernel/access): the one subset rule (`grantable`) against brute force,
delegation and offline narrowing that never widen, the one approval gate on ops other than
ipc.send, and the token format's limits agreeing between the SDK and the kernel."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sdk
from kernel.access.rules import grantable, rule_covers
from kernel.access.tokens import TokenAuthority
from kernel.core import Fault
from sdk import abi, tokens
from sdk.caps import attenuate
from tests.conftest import KernelProcess, agent, wait_until
from tests.kernel.access.test_access import Host, delegate
from tests.sdk.test_tokens import FAST, RULES, satisfied, witness_universe

KEY = bytes(range(32))
RULE_SETS = st.lists(st.lists(RULES, min_size=1, max_size=3), min_size=1, max_size=3)


def held_token(auth: TokenAuthority, rule_sets: list[list[tokens.Rule]]) -> str:
    """A token whose `allow` caveats are `rule_sets` (the first minted, the rest appended)."""
    token = auth.mint("agent:1", rule_sets[0])
    return tokens.attenuate(token, *[("allow", rules) for rules in rule_sets[1:]])


# --------------------------------------------------------------------------- grantable


@FAST
@given(RULE_SETS, st.lists(RULES, max_size=4))
def test_grantable_iff_every_requested_rule_is_covered(rule_sets: list[list[tokens.Rule]],
                                                       requested: list[tokens.Rule]) -> None:
    cap = TokenAuthority(KEY).verify(held_token(TokenAuthority(KEY), rule_sets))
    covered = all(any(rule_covers(h, r) for h in rules) for rules in rule_sets
                  for r in requested)
    assert grantable(cap, requested) == covered
    # And by brute force: every request a requested rule matches is one every rule set allows.
    universe = witness_universe([r for rules in rule_sets for r in rules] + requested)
    brute = all(satisfied(requested, universe) <= satisfied(rules, universe)
                for rules in rule_sets)
    assert grantable(cap, requested) == brute


@FAST
@given(RULE_SETS, st.lists(RULES, min_size=1, max_size=3))
def test_offline_narrowing_never_widens(rule_sets: list[list[tokens.Rule]],
                                        narrower: list[tokens.Rule]) -> None:
    auth = TokenAuthority(KEY)
    parent = held_token(auth, rule_sets)
    child = auth.verify(tokens.attenuate(parent, ("allow", narrower)))
    held = auth.verify(parent)
    universe = witness_universe([r for rules in rule_sets for r in rules] + narrower)
    for op, resource in universe:
        if child.check(op, resource, "agent:1", 0) is None:
            assert held.check(op, resource, "agent:1", 0) is None


OPS = st.sampled_from(["sys.null", "sys.stats", "proc.ps", "proc.info", "ipc.recv"])
GRANTS = st.lists(st.builds(lambda op, res: f"{op}@{res}" if res else op,
                            st.sampled_from(["sys.*", "sys.null", "proc.*", "proc.info",
                                             "ipc.recv", "*"]),
                            st.sampled_from([None, "proc/1", "proc/1/", "proc/2"])),
                  min_size=1, max_size=3)


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    h = Host(tmp_path_factory.mktemp("policy"))
    yield h
    h.db.close()


@FAST
@given(parent_caps=GRANTS, child_caps=GRANTS)
def test_delegation_is_refused_or_never_wider(host: Host, parent_caps: list[str],
                                              child_caps: list[str]) -> None:
    root = host.access.mint("user:1", caps=parent_caps)
    parent = host.authority.verify(root)
    wanted = host.access.rules(child_caps)
    try:
        grant = delegate(host, "user:1", root, "agent:1", caps=child_caps)
    except Fault as exc:
        assert exc.code == abi.ErrorCode.EPERM and not grantable(parent, wanted)
        return
    assert grantable(parent, wanted)
    child = host.authority.verify(grant.token)
    for op in ["sys.null", "sys.stats", "proc.ps", "proc.info", "ipc.recv"]:
        for resource in [None, "proc/1", "proc/1/x", "proc/2", "proc/12"]:
            if child.check(op, resource, "agent:1", 0) is None:
                assert parent.check(op, resource, "user:1", 0) is None


# --------------------------------------------------------------------------- the format


def forge(token: str, *caveats: tuple[str, object]) -> str:
    """Append caveats by hand, the way a client without the shared format (and without its
    limits) would: msgpack, the HMAC chain, base64."""
    body = token[len("aos1."):]
    key_id, ident, old, sig = msgspec.msgpack.decode(
        base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    for caveat in caveats:
        encoded = msgspec.msgpack.encode(caveat)
        old.append(encoded)
        sig = hmac.new(sig, encoded, hashlib.sha256).digest()
    raw = msgspec.msgpack.encode((key_id, ident, old, sig))
    return "aos1." + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_sdk_and_kernel_share_the_format_and_its_limits() -> None:
    auth = TokenAuthority(KEY)
    token = auth.mint("agent:1", [tokens.Rule("sys.*")])
    # What the SDK narrows, the kernel reads back exactly, signature and all.
    narrowed = attenuate(token, caps=["sys.null"], ttl=60, budgets={"calls": 3}, once=True,
                         requires_approval=["sys.null"])
    cap = auth.verify(narrowed)
    assert cap.rule_sets[-1] == (tokens.Rule("sys.null"),)
    assert cap.budgets[0][:2] == ("calls", 3) and len(cap.nonces) == 1
    assert cap.approval_rules == (tokens.Rule("sys.null"),)

    # Too long: the SDK refuses to build it; built by hand, the kernel refuses to read it.
    grown = token
    wide = [f"fs.read@fs/{'a' * 200}/{i}" for i in range(4)]
    with pytest.raises(sdk.InvalidArgument, match="token too long"):
        for _ in range(tokens.MAX_CAVEATS):
            grown = attenuate(grown, caps=wide)
    oversize = forge(grown, ("allow", [[r.partition("@")[0], r.partition("@")[2]]
                                       for r in wide]))
    assert len(oversize) > tokens.MAX_TOKEN_CHARS
    with pytest.raises(tokens.TokenError, match="token too long"):
        auth.verify(oversize)

    # Too many caveats: the same.
    many = tokens.attenuate(token, *[("exp", 2e9)] * (tokens.MAX_CAVEATS - 2))
    with pytest.raises(sdk.InvalidArgument, match="too many caveats"):
        attenuate(many, ttl=60)
    with pytest.raises(tokens.TokenError, match="too many caveats"):
        auth.verify(forge(many, ("exp", 2e9)))

    # A resource longer than a rule may name, and a malformed rule: the same.
    long = "fs/" + "a" * tokens.MAX_RESOURCE_CHARS
    for bad in ([["fs.read", long]], [["no such op", None]]):
        with pytest.raises(sdk.InvalidArgument):
            attenuate(token, caps=[f"{op}@{res}" if res else op for op, res in bad])
        with pytest.raises(tokens.TokenError, match="bad 'allow' caveat"):
            auth.verify(forge(token, ("allow", bad)))


# --------------------------------------------------------------------------- approval


CONFIG = """
[kernel]
approval_timeout = 30

[groups.held]
caps = ["sys.*"]
requires_approval = ["fs.write", "fs.delete"]
"""


@pytest.fixture(scope="module")
def pkernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    root: Path = tmp_path_factory.mktemp("policy-kernel")
    (root / "kernel.toml").write_text(CONFIG)
    k = KernelProcess(root / "state")
    k.extra_args = ["--config", str(root / "kernel.toml")]
    k.start()
    yield k
    k.stop()


def _held(admin: sdk.Connection, principal: str, seen: set[int]) -> abi.ApprovalInfo:
    found: list[abi.ApprovalInfo] = []

    def pending() -> bool:
        found[:] = [r for r in admin.approvals.list()
                    if r.principal == principal and r.id not in seen]
        return bool(found)

    assert wait_until(pending, timeout=30)
    seen.add(found[0].id)
    return found[0]


def test_requires_approval_holds_any_op_not_only_ipc_send(pkernel: KernelProcess) -> None:
    calls = [["fs.write", {"path": "a.txt", "data": "one"}],
             ["fs.write", {"path": "b.txt", "data": "two"}],
             ["fs.delete", {"path": "a.txt"}]]
    with pkernel.connect() as admin:
        # A well-behaved neighbour without the caveat: its writes run at once.
        free = admin.proc.spawn(agent("calls"), name="free-writer", argv=[json.dumps(calls[:2])])
        assert all("ok" in r for r in admin.proc.wait(free, timeout=60).result)
        assert not [r for r in admin.approvals.list() if r.principal == f"agent:{free}"]

        held = admin.proc.spawn(agent("calls"), name="held-writer", argv=[json.dumps(calls)],
                                group="held")
        principal, seen = f"agent:{held}", set()
        first = _held(admin, principal, seen)
        assert first.action == "fs.write" and first.detail["resource"].endswith("/a.txt")
        assert admin.proc.info(held).state == "running"  # blocked in fs.write
        admin.approvals.approve(first.id)
        second = _held(admin, principal, seen)
        assert second.action == "fs.write"
        admin.approvals.deny(second.id, "not that one")
        third = _held(admin, principal, seen)
        assert third.action == "fs.delete"  # held once: by its caveat, not again as a delete
        admin.approvals.approve(third.id)
        result = admin.proc.wait(held, timeout=60).result
        assert "ok" in result[0] and result[1]["err"] == "EPERM" and "ok" in result[2], result
        assert not [r for r in admin.approvals.list() if r.principal == principal]
