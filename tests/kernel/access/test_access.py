"""The access manager's algebra, in process, on a real database: a Hypothesis state machine over
mint / delegate / attenuate / revoke (as any holder) / use / tick (expiry) / restart / key
rotation that checks the kernel's own budget counters, plus fixed cases for each rule, tampering,
the denial-audit rate limit, the audit anchor and the Ed25519 export."""

from __future__ import annotations

import base64
import math
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

import kernel.access.guard as guard_module
import kernel.access.manager as manager_module
import sdk.caps as sdk_caps
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
        self.config = Config(state_dir=self.root)
        self.access = AccessManager(config=self.config, db=self.db, audit=self.audit,
                                    authority=TokenAuthority(self.state_key()),
                                    key_path=self.root / "secret.key")
        self.guard = Guard(access=self.access, audit=self.audit, config=self.config)

    @property
    def authority(self) -> TokenAuthority:
        return self.access.authority  # a key rotation replaces it

    def state_key(self) -> bytes:
        path = self.root / "secret.key"  # written by a key rotation
        return path.read_bytes() if path.exists() else KEY

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

    def use(self, token: str, op: str, principal: str,
            resource: str | None = None) -> abi.ErrorCode | None:
        try:
            self.guard.check(token, op, resource, Caller(principal, None))
        except Fault as exc:
            return exc.code
        finally:
            self.commit()
        return None


def delegate(host: Host, holder: str, parent: str, to: str, **kw: object) -> abi.Grant:
    return host.access.delegate(host.call(holder, parent), abi.DelegateArgs(to=to, token=parent,
                                                                            **kw))


# --------------------------------------------------------------------------- the model

# Rules a token may hold and the requests it is used for. Resource-scoped rules cover a path and
# what lies under it, by whole segments ("proc/1" covers "proc/1/x", not "proc/12").
RULES = ["sys.null", "sys.stats", "proc.ps", "caps.revoke", "proc.info@proc/1",
         "proc.info@proc/1/x", "proc.info@proc/12"]
REQUESTS = [("sys.null", None), ("sys.stats", None), ("proc.ps", None), ("caps.revoke", None),
            ("proc.info", "proc/1"), ("proc.info", "proc/1/x"), ("proc.info", "proc/12"),
            ("proc.info", "proc/1x")]
PRINCIPALS = ["user:1", "agent:1", "agent:2"]
TTLS = st.sampled_from([None, None, None, 10.0, 100.0, 1000.0])
# Small budgets run out within a run; 64 has a high-water mark 2 ahead of the count.
BUDGETS = st.none() | st.integers(0, 4) | st.just(64)


def _split(rule: str) -> tuple[str, str | None]:
    op, _, resource = rule.partition("@")
    return op, resource or None


def _under(prefix: str, resource: str) -> bool:
    return resource == prefix or resource.startswith(prefix + "/")


def model_matches(rule: str, request: tuple[str, str | None]) -> bool:
    op, resource = _split(rule)
    return op == request[0] and (resource is None or (request[1] is not None
                                                      and _under(resource, request[1])))


def model_covers(parent: str, child: str) -> bool:
    (pop, pres), (cop, cres) = _split(parent), _split(child)
    return pop == cop and (pres is None or (cres is not None and _under(pres, cres)))


def caller(principal: str) -> Caller:
    kind, _, n = principal.partition(":")
    return Caller(principal, int(n) if kind == "agent" else None)


class Clock:
    """`time` for the access modules under test: the machine moves `now` by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


@dataclass
class Tok:
    """What the model says about one token string."""

    token: str
    holder: str
    sets: tuple[frozenset[str], ...]  # a request must match a rule of every set
    nodes: tuple[str, ...]  # token ids of itself and its ancestors (revocation)
    counters: tuple[tuple[str, int], ...]  # (counter, limit) of its budget caveats
    nonces: frozenset[str]
    expires_at: float
    epoch: int  # the key generation that signed it
    held: frozenset[str] = frozenset()  # requires_approval rules
    parent: Tok | None = None

    def allows(self, request: tuple[str, str | None]) -> bool:
        return all(any(model_matches(r, request) for r in s) for s in self.sets)

    def grants(self, rules: set[str]) -> bool:
        return all(all(any(model_covers(p, c) for p in s) for c in rules) for s in self.sets)


class AccessMachine(RuleBasedStateMachine):
    """The model predicts every answer; the kernel's own state (budget counters read through
    `usage` and from the database after a restart, the verified caveats of what it minted) is
    compared with the model, never the model with itself."""

    tokens = Bundle("tokens")

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self._dir = tempfile.TemporaryDirectory()
        self.clock = Clock()
        self._patched = [(m, m.time) for m in (manager_module, guard_module, sdk_caps)]
        for module, _ in self._patched:
            module.time = self.clock
        self.host = Host(Path(self._dir.name), anchor=False)  # the anchor's fsyncs: tested below
        self.epoch = 0
        self.revoked: set[str] = set()
        self.used: dict[str, int] = {}
        self.spent: set[str] = set()
        self.all: list[Tok] = []

    def teardown(self) -> None:
        for module, real in self._patched:
            module.time = real
        self.host.db.close()
        self._dir.cleanup()

    def _add(self, tok: Tok) -> Tok:
        self.all.append(tok)
        return tok

    def _new(self, token: str, parent: Tok | None, budget: int | None,
             once: bool) -> tuple[tuple[tuple[str, int], ...], frozenset[str]]:
        """The counters and nonces a new token must carry: its parent's, plus the ones it asked
        for (their ids are the kernel's choice, read from the token)."""
        cap = self.host.authority.verify(token)
        old = {c for c, _ in parent.counters} if parent else set()
        fresh = [(bid, limit) for _, limit, bid in cap.budgets if bid not in old]
        assert [limit for _, limit in fresh] == ([] if budget is None else [budget])
        nonces = frozenset(cap.nonces) - (parent.nonces if parent else frozenset())
        assert len(nonces) == once
        return ((parent.counters if parent else ()) + tuple(fresh),
                (parent.nonces if parent else frozenset()) | nonces)

    def _dead(self, tok: Tok) -> bool:
        return tok.epoch != self.epoch or bool(self.revoked & set(tok.nodes))

    def _expect(self, tok: Tok, request: tuple[str, str | None],
                who: str) -> abi.ErrorCode | None:
        if (who != tok.holder or not tok.allows(request) or self.clock.now >= tok.expires_at
                or self._dead(tok) or tok.nonces & self.spent):
            return abi.ErrorCode.EPERM
        if any(self.used.get(c, 0) + 1 > limit for c, limit in tok.counters):
            return abi.ErrorCode.EQUOTA
        return None

    def _use(self, tok: Tok, request: tuple[str, str | None], who: str) -> bool:
        """One syscall through the guard; True if it was admitted."""
        expect = self._expect(tok, request, who)
        assert self.host.use(tok.token, request[0], who, request[1]) == expect
        if expect is not None:
            return False
        for counter in {c for c, _ in tok.counters}:
            self.used[counter] = self.used.get(counter, 0) + 1
        self.spent |= tok.nonces
        # Never wider than its ancestors, through the admission path: what the kernel admitted
        # for a token, every ancestor's caveats allow too.
        cap = self.host.authority.verify(tok.token)
        assert any(r.matches(*request) for r in cap.approval_rules) == any(
            model_matches(r, request) for r in tok.held), "requires_approval lost or invented"
        node = tok.parent
        while node is not None:
            parent = self.host.authority.verify(node.token)
            assert parent.check(request[0], request[1], node.holder, self.clock.now) is None
            node = node.parent
        return True

    @initialize(target=tokens, budgets=st.lists(BUDGETS, min_size=3,
                                                max_size=3), ttl=TTLS)
    def roots(self, budgets: list[int | None], ttl: float | None) -> MultipleResults[Tok]:
        """Every run starts with a root token for each principal, three trees to work in."""
        return multiple(*(self.mint(holder, set(RULES), budget, False, ttl)
                          for holder, budget in zip(PRINCIPALS, budgets, strict=True)))

    @rule(target=tokens, holder=st.sampled_from(PRINCIPALS),
          rules=st.sets(st.sampled_from(RULES), min_size=1), budget=BUDGETS,
          once=st.booleans(), ttl=TTLS)
    def mint(self, holder: str, rules: set[str], budget: int | None, once: bool,
             ttl: float | None) -> Tok:
        token = self.host.access.mint(holder, caps=sorted(rules), once=once, ttl=ttl,
                                      budgets={"calls": budget} if budget is not None else None)
        self.host.commit()
        counters, nonces = self._new(token, None, budget, once)
        return self._add(Tok(token, holder, (frozenset(rules),),
                             (self.host.authority.verify(token).token_id,), counters, nonces,
                             self.clock.now + ttl if ttl else math.inf, self.epoch))

    @rule(target=tokens, parent=tokens, to=st.sampled_from(PRINCIPALS),
          rules=st.sets(st.sampled_from(RULES)), budget=BUDGETS,
          once=st.booleans(), ttl=TTLS, held=st.sets(st.sampled_from(RULES), max_size=1))
    def delegate(self, parent: Tok, to: str, rules: set[str], budget: int | None,
                 once: bool, ttl: float | None, held: set[str]) -> Tok:
        try:
            grant = delegate(self.host, parent.holder, parent.token, to, caps=sorted(rules),
                             once=once, budgets={"calls": budget} if budget is not None else {},
                             ttl_s=ttl, requires_approval=sorted(held))
        except (Fault, TokenError) as exc:
            self.host.commit()
            assert isinstance(exc, TokenError) or exc.code == abi.ErrorCode.EPERM
            assert self._dead(parent) or not parent.grants(rules)
            return self._add(parent)  # nothing new; keep the bundle growing
        self.host.commit()
        assert not self._dead(parent), "delegated from a revoked token"
        assert parent.grants(rules), "the subset rule let a wider child through"
        cap = self.host.authority.verify(grant.token)
        assert cap.parent_id == parent.nodes[0]
        counters, nonces = self._new(grant.token, parent, budget, once)
        sets = parent.sets + ((frozenset(rules),) if rules else ())
        expires_at = min(parent.expires_at, self.clock.now + ttl if ttl else math.inf)
        return self._add(Tok(grant.token, to, sets, (cap.token_id, *parent.nodes), counters,
                             nonces, expires_at, self.epoch, parent.held | held, parent))

    @rule(target=tokens, tok=tokens, rules=st.sets(st.sampled_from(RULES)),
          budget=BUDGETS, once=st.booleans(), ttl=TTLS,
          held=st.sets(st.sampled_from(RULES), max_size=1))
    def attenuate(self, tok: Tok, rules: set[str], budget: int | None, once: bool,
                  ttl: float | None, held: set[str]) -> Tok:
        if tok.epoch != self.epoch:
            return tok  # signed by a retired key: the kernel can no longer read it
        token = attenuate(tok.token, caps=sorted(rules), once=once, ttl=ttl,
                          requires_approval=sorted(held),
                          budgets={"calls": budget} if budget is not None else None)
        assert self.host.authority.verify(token).token_id == tok.nodes[0]
        counters, nonces = self._new(token, tok, budget, once)
        sets = tok.sets + ((frozenset(rules),) if rules else ())
        expires_at = min(tok.expires_at, self.clock.now + ttl if ttl else math.inf)
        return self._add(Tok(token, tok.holder, sets, tok.nodes, counters, nonces, expires_at,
                             tok.epoch, tok.held | held, tok.parent))

    @rule(tok=tokens, data=st.data())
    def revoke(self, tok: Tok, data: st.DataObject) -> None:
        """`caps.revoke` as the holder of some token `by`: a user may revoke any token, an agent
        only `by` itself and the tokens derived from it."""
        able = [t for t in self.all if t.allows(("caps.revoke", None))]
        by = data.draw(st.sampled_from(able or self.all))
        if not self._use(by, ("caps.revoke", None), by.holder):
            return
        call = Call(b"", 0, "caps.revoke", caller(by.holder),
                    capability=self.host.authority.verify(by.token))
        try:
            self.host.access.revoke_call(call, tok.nodes[0])
        except Fault as exc:
            assert exc.code == abi.ErrorCode.EPERM
            assert by.holder.startswith("agent:") and by.nodes[0] not in tok.nodes
            return
        finally:
            self.host.commit()
        assert by.holder.startswith("user:") or by.nodes[0] in tok.nodes, \
            "an agent revoked a token outside its own tree"
        self.revoked.add(tok.nodes[0])

    @rule(tok=tokens, data=st.data())
    def use(self, tok: Tok, data: st.DataObject) -> None:
        # Mostly well-aimed uses (the holder, a right it has), so budgets and revocation bite;
        # often of the newest token, the deepest in its tree.
        if data.draw(st.booleans()):
            tok = self.all[-1]
        aimed = [r for r in REQUESTS if tok.allows(r)]
        for _ in range(data.draw(st.integers(1, 3))):
            who = data.draw(st.sampled_from([tok.holder] * 4 + PRINCIPALS))
            self._use(tok, data.draw(st.sampled_from(aimed * 4 + REQUESTS)), who)

    @rule(seconds=st.sampled_from([1.0, 30.0, 200.0]))
    def tick(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule()
    def restart(self) -> None:
        self.host.restart()
        # A clean restart writes exact counts: the database holds what the model says was spent.
        stored = self.host.access.store.budgets()
        for tok in self.all:
            for counter, _ in tok.counters:
                assert stored.get(f"{tok.nodes[-1]}/{counter}", 0) == self.used.get(counter, 0)

    @rule()
    def crash(self) -> None:
        """Killed, no clean close: each counter resumes at the mark the database holds, never
        below what was spent, never over its limit, at most one step (limit // 32) ahead."""
        self.host.db.close()
        self.host.open()
        stored = self.host.access.store.budgets()
        counters = {c: (tok.nodes[-1], limit) for tok in self.all for c, limit in tok.counters}
        for counter, (root, limit) in counters.items():
            used, mark = self.used.get(counter, 0), stored.get(f"{root}/{counter}", 0)
            assert used <= mark <= min(limit, used + limit // 32)
            self.used[counter] = mark  # the steps lost to the crash count as spent

    @precondition(lambda self: self.epoch == 0 and len(self.all) >= 8)
    @rule()
    def rotate_key(self) -> None:
        self.host.access.rotate_key("user:1")
        self.host.commit()
        self.epoch += 1

    @invariant()
    def budgets_are_the_kernels(self) -> None:
        """The kernel's own counters (`usage`, as `caps.inspect` shows them) are what the model
        spent, and never over a limit."""
        for tok in {t.token: t for t in self.all}.values():
            if tok.epoch != self.epoch or not tok.counters:
                continue
            used, limit = self.host.access.usage(self.host.authority.verify(tok.token))["calls"]
            assert used <= limit
            tightest = min(lim - self.used.get(c, 0) for c, lim in tok.counters)
            assert limit - used == tightest
            assert (used, limit) in {(self.used.get(c, 0), lim) for c, lim in tok.counters}


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


def test_an_agent_revokes_only_its_own_tree(host: Host) -> None:
    mine = host.access.mint("agent:1", caps=["caps.revoke", "sys.null"])
    child = delegate(host, "agent:1", mine, "agent:2", caps=["sys.null"]).token
    theirs = host.access.mint("agent:2", caps=["caps.revoke", "sys.null"])

    def revoke_as(principal: str, token: str, target: str) -> int:
        call = Call(b"", 0, "caps.revoke", caller(principal),
                    capability=host.guard.check(token, "caps.revoke", None, caller(principal)))
        return host.access.revoke_call(call, host.authority.verify(target).token_id)

    for holder, token, target in [("agent:1", mine, theirs), ("agent:2", theirs, mine),
                                  ("agent:2", theirs, child)]:
        with pytest.raises(Fault) as info:
            revoke_as(holder, token, target)
        assert info.value.code == abi.ErrorCode.EPERM
    host.commit()
    assert host.use(theirs, "sys.null", "agent:2") is None
    assert host.use(child, "sys.null", "agent:2") is None
    assert revoke_as("agent:1", mine, child) == 1  # one it derived
    assert host.use(child, "sys.null", "agent:2") == abi.ErrorCode.EPERM
    assert revoke_as("user:1", host.access.mint("user:1", caps=["caps.revoke"]), theirs) == 1
    assert host.use(theirs, "sys.null", "agent:2") == abi.ErrorCode.EPERM


def test_expiry_passes_to_children_and_attenuations(host: Host,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    for module in (manager_module, guard_module, sdk_caps):
        monkeypatch.setattr(module, "time", clock)
    root = host.access.mint("agent:1", caps=["sys.null"], ttl=100)
    child = delegate(host, "agent:1", root, "agent:2", ttl_s=1000).token
    short = attenuate(child, ttl=10)
    clock.now += 9
    assert host.use(short, "sys.null", "agent:2") is None
    clock.now += 1
    assert host.use(short, "sys.null", "agent:2") == abi.ErrorCode.EPERM
    assert host.use(child, "sys.null", "agent:2") is None
    clock.now += 90  # the parent's expiry binds the child that asked for longer
    assert host.use(root, "sys.null", "agent:1") == abi.ErrorCode.EPERM
    assert host.use(child, "sys.null", "agent:2") == abi.ErrorCode.EPERM


def test_resource_rules_cover_whole_segments(host: Host) -> None:
    token = host.access.mint("agent:1", caps=["proc.info@proc/1", "fs.read@fs/a/"])
    for resource, ok in [("proc/1", True), ("proc/1/x", True), ("proc/12", False),
                         ("proc/1x", False), ("proc", False), ("proc/2/../1", False)]:
        assert (host.use(token, "proc.info", "agent:1", resource) is None) == ok, resource
    for resource, ok in [("fs/a/b", True), ("fs/ab", False), ("fs/a", False)]:
        assert (host.use(token, "fs.read", "agent:1", resource) is None) == ok, resource
    for wider in (["proc.info@proc/"], ["proc.info@proc/12"], ["fs.read@fs/"]):
        with pytest.raises(Fault):
            delegate(host, "agent:1", token, "agent:2", caps=wider)
    child = delegate(host, "agent:1", token, "agent:2", caps=["proc.info@proc/1/x"]).token
    assert host.use(child, "proc.info", "agent:2", "proc/1/x/y") is None
    assert host.use(child, "proc.info", "agent:2", "proc/1") == abi.ErrorCode.EPERM


def test_requires_approval_is_inherited(host: Host) -> None:
    root = host.access.mint("user:1", caps=["sys.*", "proc.info@proc/"])
    child = delegate(host, "user:1", root, "agent:1", requires_approval=["proc.info@proc/3"]).token
    grandchild = delegate(host, "agent:1", child, "agent:2", caps=["proc.info@proc/"]).token
    narrowed = attenuate(grandchild, requires_approval=["sys.null"])
    for token, held in [(child, {("proc.info", "proc/3")}), (grandchild, {("proc.info", "proc/3")}),
                        (narrowed, {("proc.info", "proc/3"), ("sys.null", None)})]:
        rules = host.authority.verify(token).approval_rules
        for request in [("proc.info", "proc/3"), ("proc.info", "proc/4"), ("sys.null", None)]:
            assert any(r.matches(*request) for r in rules) == (request in held), request


def test_key_rotation_retires_every_token_also_after_restart(host: Host) -> None:
    old = host.access.mint("agent:1", caps=["sys.null"])
    assert host.use(old, "sys.null", "agent:1") is None
    host.access.rotate_key("user:1")
    host.commit()
    assert host.use(old, "sys.null", "agent:1") == abi.ErrorCode.EPERM
    new = host.access.mint("agent:1", caps=["sys.null"])
    assert host.use(new, "sys.null", "agent:1") is None
    host.restart()
    assert host.use(old, "sys.null", "agent:1") == abi.ErrorCode.EPERM
    assert host.use(new, "sys.null", "agent:1") is None
    with pytest.raises((Fault, TokenError)):
        delegate(host, "agent:1", old, "agent:2")


def test_denials_are_audited_at_a_bounded_rate_per_principal(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood of denials costs at most `audit_denials_per_s` audit records a second per
    principal; the next record says how many were left out, and a neighbour's first denial is
    recorded whatever the flood."""
    clock = Clock()
    monkeypatch.setattr(guard_module, "time", clock)
    host.config.audit_denials_per_s = 5.0
    token = host.access.mint("agent:1", caps=["sys.null"])

    def denials(principal: str) -> list[dict]:
        return [r for r in host.audit.rows(limit=10**6)
                if r["event"] == "deny" and r["principal"] == principal]

    for _ in range(50):
        assert host.use(token, "sys.stats", "agent:1") == abi.ErrorCode.EPERM
    assert len(denials("agent:1")) == 5
    assert host.use(token, "sys.null", "agent:2") == abi.ErrorCode.EPERM
    [neighbour] = denials("agent:2")
    assert neighbour["detail"]["reason"] == "audience mismatch"
    assert neighbour["detail"]["suppressed_before"] == 45  # left out since the last record
    clock.now += 0.2  # one more denial's worth for agent:1
    assert host.use(token, "sys.stats", "agent:1") == abi.ErrorCode.EPERM
    assert host.use(token, "sys.stats", "agent:1") == abi.ErrorCode.EPERM
    flood = denials("agent:1")
    assert len(flood) == 6 and flood[-1]["detail"]["call"] == "sys.stats"
    assert flood[-1]["detail"]["suppressed_before"] == 0
    assert host.guard.suppressed == 1
