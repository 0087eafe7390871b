"""The access manager's algebra, in process, on a real database: a Hypothesis state machine over
mint / delegate / attenuate / revoke / use / restart, plus tampering, the audit anchor and the
Ed25519 export."""

from __future__ import annotations

import base64
import itertools
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from kernel.access.audit import AuditLog
from kernel.access.export import check_export, export_token, verify_export
from kernel.access.guard import Guard
from kernel.access.manager import AccessManager
from kernel.access.tokens import TokenAuthority
from kernel.call import Call, Caller, Fault
from kernel.config import Config
from kernel.db import Database
from sdk import abi
from sdk.caps import attenuate
from sdk.tokens import TokenError
from sdk.tokens import attenuate as kernel_attenuate

KEY = bytes(range(32))
OPS = ["sys.null", "sys.stats", "proc.ps", "ipc.recv"]
PRINCIPALS = ["user:1", "agent:1", "agent:2"]


class Host:
    """The parts of a kernel the access manager uses, real but without the transport."""

    def __init__(self, root: Path, anchor: bool = True) -> None:
        self.root = root
        self.anchor = anchor
        self.open()

    def open(self) -> None:
        self.db = Database(self.root / "kernel.db")
        # Restarts here are clean or process-level crashes; no test pulls the power, so skip
        # the fsyncs that would only slow the state machine down.
        self.db.conn.execute("PRAGMA synchronous=OFF")
        self.audit = AuditLog(self.db, self.root / "audit.head" if self.anchor else None)
        self.authority = TokenAuthority(KEY)
        self.config = Config(state_dir=self.root)
        self.state = SimpleNamespace(key_path=self.root / "secret.key", root=self.root)
        self.access = AccessManager(self)
        self.guard = Guard(self)

    def commit(self) -> None:
        self.db.commit()
        self.audit.anchor()

    def restart(self) -> None:
        self.access.close()
        self.commit()
        self.db.close()
        self.open()

    def call(self, principal: str, token: str, name: str = "caps.delegate") -> Call:
        return Call(b"", 0, name, Caller(principal, None), capability=self.authority.verify(token))

    def use(self, token: str, op: str, principal: str) -> abi.ErrorCode | None:
        try:
            self.guard.check(token, op, None, Caller(principal, None))
        except Fault as exc:
            return exc.code
        finally:
            self.commit()
        return None


def delegate(host: Host, holder: str, parent: str, to: str, **kw: object) -> abi.Grant:
    return host.access.delegate(host.call(holder, parent), abi.DelegateArgs(to=to, token=parent,
                                                                            **kw))


# --------------------------------------------------------------------------- the model


@dataclass
class Tok:
    """What the model says about one token string."""

    token: str
    holder: str
    ops: frozenset[str]
    nodes: tuple[str, ...]  # token ids of itself and its ancestors (revocation)
    counters: tuple[tuple[str, int], ...]  # (counter, limit) of its budget caveats
    nonces: frozenset[str] = field(default_factory=frozenset)
    parent: Tok | None = None


class AccessMachine(RuleBasedStateMachine):
    tokens = Bundle("tokens")

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self._dir = tempfile.TemporaryDirectory()
        self.host = Host(Path(self._dir.name), anchor=False)  # the anchor's fsyncs: tested below
        self.revoked: set[str] = set()
        self.used: dict[str, int] = {}
        self.spent: set[str] = set()
        self.all: list[Tok] = []
        self.fresh = itertools.count()

    def teardown(self) -> None:
        self.host.db.close()
        self._dir.cleanup()

    def _counters(self, cap_budgets: tuple, inherited: tuple) -> tuple[tuple[str, int], ...]:
        own = tuple((bid, limit) for _, limit, bid in cap_budgets)
        return tuple(dict.fromkeys(own + inherited))

    def _add(self, tok: Tok) -> Tok:
        self.all.append(tok)
        return tok

    @rule(target=tokens, holder=st.sampled_from(PRINCIPALS),
          ops=st.sets(st.sampled_from(OPS), min_size=1), budget=st.none() | st.integers(0, 4),
          once=st.booleans())
    def mint(self, holder: str, ops: set[str], budget: int | None, once: bool) -> Tok:
        token = self.host.access.mint(holder, caps=sorted(ops), once=once,
                                      budgets={"calls": budget} if budget is not None else None)
        self.host.commit()
        cap = self.host.authority.verify(token)
        return self._add(Tok(token, holder, frozenset(ops), (cap.token_id,),
                             self._counters(cap.budgets, ()), frozenset(cap.nonces)))

    @rule(target=tokens, parent=tokens, to=st.sampled_from(PRINCIPALS),
          ops=st.sets(st.sampled_from(OPS)), budget=st.none() | st.integers(0, 4),
          once=st.booleans())
    def delegate(self, parent: Tok, to: str, ops: set[str], budget: int | None,
                 once: bool) -> Tok:
        try:
            grant = delegate(self.host, parent.holder, parent.token, to, caps=sorted(ops),
                             once=once, budgets={"calls": budget} if budget is not None else {})
        except Fault as exc:
            self.host.commit()
            assert exc.code == abi.ErrorCode.EPERM
            assert self.revoked & set(parent.nodes) or not ops <= parent.ops
            return self._add(parent)  # nothing new; keep the bundle growing
        self.host.commit()
        assert not self.revoked & set(parent.nodes), "delegated from a revoked token"
        assert ops <= parent.ops, "the subset rule let a wider child through"
        cap = self.host.authority.verify(grant.token)
        assert cap.parent_id == parent.nodes[0]
        new = self._counters(cap.budgets, ())
        return self._add(Tok(grant.token, to, frozenset(ops or parent.ops),
                             (cap.token_id, *parent.nodes), new, frozenset(cap.nonces), parent))

    @rule(target=tokens, tok=tokens, ops=st.sets(st.sampled_from(OPS)),
          budget=st.none() | st.integers(0, 4), once=st.booleans())
    def attenuate(self, tok: Tok, ops: set[str], budget: int | None, once: bool) -> Tok:
        token = attenuate(tok.token, caps=sorted(ops), once=once,
                          budgets={"calls": budget} if budget is not None else None)
        cap = self.host.authority.verify(token)
        assert cap.token_id == tok.nodes[0]
        return self._add(Tok(token, tok.holder, tok.ops & ops if ops else tok.ops, tok.nodes,
                             self._counters(cap.budgets, ()), frozenset(cap.nonces), tok.parent))

    @rule(tok=tokens)
    def revoke(self, tok: Tok) -> None:
        self.host.access.revoke(tok.nodes[0], "user:1", "test")
        self.host.commit()
        self.revoked.add(tok.nodes[0])

    @rule(tok=tokens, data=st.data())
    def use(self, tok: Tok, data: st.DataObject) -> None:
        # Mostly well-aimed uses (the holder, a right it has), so budgets and revocation bite.
        who = data.draw(st.sampled_from([tok.holder] * 4 + PRINCIPALS))
        op = data.draw(st.sampled_from(sorted(tok.ops) * 4 + OPS))
        if who != tok.holder or op not in tok.ops or self.revoked & set(tok.nodes) or (
                tok.nonces & self.spent):
            expect = abi.ErrorCode.EPERM
        elif any(self.used.get(c, 0) + 1 > limit for c, limit in tok.counters):
            expect = abi.ErrorCode.EQUOTA
        else:
            expect = None
        assert self.host.use(tok.token, op, who) == expect
        if expect is None:
            for counter in {c for c, _ in tok.counters}:
                self.used[counter] = self.used.get(counter, 0) + 1
            self.spent |= tok.nonces

    @rule()
    def restart(self) -> None:
        self.host.restart()

    @invariant()
    def never_wider_than_parent(self) -> None:
        for tok in self.all[-3:]:
            if tok.parent is None:
                continue
            child = self.host.authority.verify(tok.token)
            parent = self.host.authority.verify(tok.parent.token)
            for op in OPS:
                if child.check(op, None, tok.holder, 0) is None:
                    assert parent.check(op, None, tok.parent.holder, 0) is None

    @invariant()
    def budgets_never_exceeded(self) -> None:
        limits: dict[str, int] = {}
        for tok in self.all:
            for counter, limit in tok.counters:
                limits[counter] = min(limit, limits.get(counter, limit))
        for counter, used in self.used.items():
            assert used <= limits[counter]


AccessMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30,
                                           deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
TestAccessMachine = AccessMachine.TestCase


# --------------------------------------------------------------------------- fixed cases


@pytest.fixture
def host(tmp_path: Path) -> Host:
    h = Host(tmp_path)
    yield h
    h.db.close()


def test_revocation_covers_the_tree_and_survives_restart(host: Host) -> None:
    root = host.access.mint("user:1", caps=["sys.*", "proc.ps"])
    child = delegate(host, "user:1", root, "agent:1", caps=["sys.*"]).token
    grandchild = delegate(host, "agent:1", child, "agent:2", caps=["sys.null"]).token
    narrowed = attenuate(grandchild, caps=["sys.null"])
    assert host.use(narrowed, "sys.null", "agent:2") is None
    assert host.access.revoke(host.authority.verify(child).token_id, "user:1", "test") == 2
    host.commit()
    for token, who in [(child, "agent:1"), (grandchild, "agent:2"), (narrowed, "agent:2")]:
        assert host.use(token, "sys.null", who) == abi.ErrorCode.EPERM
    assert host.use(root, "sys.null", "user:1") is None
    host.restart()
    assert host.use(narrowed, "sys.null", "agent:2") == abi.ErrorCode.EPERM
    assert host.use(root, "sys.null", "user:1") is None


def test_subset_rule_is_checked_by_the_kernel(host: Host) -> None:
    root = host.access.mint("user:1", caps=["proc.info@proc/3", "sys.null"])
    for wider in (["proc.info@proc/"], ["proc.*"], ["*"], ["proc.kill@proc/3"]):
        with pytest.raises(Fault) as info:
            delegate(host, "user:1", root, "agent:1", caps=wider)
        assert info.value.code == abi.ErrorCode.EPERM
    child = delegate(host, "user:1", root, "agent:1", caps=["proc.info@proc/3/x"]).token
    assert host.guard.check(child, "proc.info", "proc/3/x", Caller("agent:1", None))
    # A delegation from someone else's token is refused: its audience is not the caller.
    with pytest.raises(Fault):
        delegate(host, "agent:2", root, "agent:1")


def test_one_shot_is_durable_across_restart(host: Host) -> None:
    token = host.access.mint("agent:1", caps=["sys.null"], once=True)
    copy = attenuate(token, caps=["sys.null"])  # shares the nonce
    assert host.use(copy, "sys.null", "agent:1") is None
    host.restart()
    assert host.use(token, "sys.null", "agent:1") == abi.ErrorCode.EPERM


def test_budget_is_shared_with_children_and_survives_restart(host: Host) -> None:
    root = host.access.mint("user:1", caps=["sys.null"], budgets={"calls": 3})
    child = delegate(host, "user:1", root, "agent:1", budgets={"calls": 10}).token
    assert host.use(child, "sys.null", "agent:1") is None
    assert host.use(root, "sys.null", "user:1") is None
    host.restart()
    assert host.use(child, "sys.null", "agent:1") is None
    assert host.use(child, "sys.null", "agent:1") == abi.ErrorCode.EQUOTA
    assert host.use(root, "sys.null", "user:1") == abi.ErrorCode.EQUOTA
    info = host.access.info(host.authority.verify(child))
    assert info.budgets["calls"] == [3, 3]


def test_another_trees_counter_id_cannot_drain_its_budget(host: Host) -> None:
    victim = host.access.mint("agent:1", caps=["sys.null"], budgets={"calls": 2})
    [(_, _, counter)] = host.authority.verify(victim).budgets
    mine = host.access.mint("agent:2", caps=["sys.null"])
    forged = kernel_attenuate(mine, ("budget", ["calls", 100, counter]))
    for _ in range(5):
        assert host.use(forged, "sys.null", "agent:2") is None
    assert host.use(victim, "sys.null", "agent:1") is None
    assert host.use(victim, "sys.null", "agent:1") is None
    assert host.use(victim, "sys.null", "agent:1") == abi.ErrorCode.EQUOTA


def test_budget_after_a_crash_never_exceeds_and_loses_at_most_one_step(host: Host) -> None:
    token = host.access.mint("agent:1", caps=["sys.null"], budgets={"calls": 640})  # step 20
    for _ in range(30):
        assert host.use(token, "sys.null", "agent:1") is None
    host.commit()
    host.db.close()  # a crash: no close(), only what was committed survives
    host.open()
    left = 0
    while host.use(token, "sys.null", "agent:1") is None:
        left += 1
    assert 640 - 30 - 20 <= left <= 640 - 30


def _repack(token: str, mutate) -> str:
    body = token[5:]
    parts = msgspec.msgpack.decode(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    mutate(parts)
    return "aos1." + base64.urlsafe_b64encode(msgspec.msgpack.encode(parts)).rstrip(
        b"=").decode()


def test_tampered_tokens_are_refused_with_eperm(host: Host) -> None:
    root = host.access.mint("user:1", caps=["sys.*"])
    token = delegate(host, "user:1", root, "agent:1", caps=["sys.null"],
                     budgets={"calls": 100}, once=False).token
    assert host.use(token, "sys.null", "agent:1") is None
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for i in range(5, len(token)):
        bits = alphabet.index(token[i])
        for flip in (1, 2, 4, 8, 16, 32):
            if bits ^ flip < 64:
                bad = token[:i] + alphabet[bits ^ flip] + token[i + 1:]
                assert host.use(bad, "sys.null", "agent:1") == abi.ErrorCode.EPERM, i
    for cut in range(len(token) - 1, 0, -7):
        assert host.use(token[:cut], "sys.null", "agent:1") == abi.ErrorCode.EPERM
    for index in range(4):  # aud, allow, the copied allow, budget: removing any is refused
        stripped = _repack(token, lambda parts, i=index: parts[2].pop(i))
        assert host.use(stripped, "sys.null", "agent:1") == abi.ErrorCode.EPERM
    # A token whose signature is right but which the kernel never recorded is refused.
    unrecorded = host.authority.mint("agent:1", [])
    assert host.use(unrecorded, "sys.null", "agent:1") == abi.ErrorCode.EPERM


def test_audience_is_enforced_for_offline_attenuation(host: Host) -> None:
    token = host.access.mint("agent:1", caps=["sys.*"])
    narrowed = attenuate(token, caps=["sys.null"], ttl=60)
    assert host.use(narrowed, "sys.null", "agent:1") is None
    assert host.use(narrowed, "sys.stats", "agent:1") == abi.ErrorCode.EPERM
    assert host.use(narrowed, "sys.null", "agent:2") == abi.ErrorCode.EPERM


def test_audit_anchor_detects_truncation(host: Host) -> None:
    for i in range(5):
        host.audit.append("kernel", "test", n=i)
    host.commit()
    assert host.audit.verify() is None
    conn = sqlite3.connect(host.root / "kernel.db")
    conn.execute("DELETE FROM audit WHERE seq >= 4")
    conn.commit()
    conn.close()
    assert host.audit.verify() == 4
    os.unlink(host.root / "audit.head")
    assert host.audit.verify() is None  # without the anchor, truncation is invisible


def test_ed25519_export_verifies_without_the_hmac_key(host: Host) -> None:
    token = host.access.mint("agent:1", caps=["proc.info@proc/3"], ttl=60)
    cap = host.authority.verify(token)
    exported, public = export_token(host.root / "export.key", cap, "agent:1", 30)
    claims = verify_export(exported, public)
    assert check_export(claims, "proc.info", "proc/3", "agent:1") is None
    assert check_export(claims, "proc.info", "proc/4", "agent:1") is not None
    assert check_export(claims, "proc.info", "proc/3", "agent:2") == "audience mismatch"
    with pytest.raises(TokenError):
        verify_export(exported, public, now=claims["exp"])
    body, sig = exported[6:].split(".")
    forged = "aosx1." + body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1] + "." + sig
    with pytest.raises(TokenError):
        verify_export(forged, public)
    # The same key signs every export; a second export verifies with the first public key.
    again, public2 = export_token(host.root / "export.key", cap, "agent:1", 30)
    assert public2 == public and verify_export(again, public)
