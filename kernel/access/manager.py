"""The access manager: delegation, revocation, budgets and one-shot tokens, kept in the kernel.

Tokens carry what a holder may do; the kernel keeps what a token cannot: its place in the
derivation tree (`tokens.parent`), whether it or an ancestor was revoked, how much of each budget
has been spent, and which one-shot nonces were used. Every use of a token passes `admit`, after
the HMAC chain and the stateless caveats were checked:

- the token and every ancestor must be known and unrevoked (revoking a token therefore revokes
  its whole derivation tree before the next dispatch, also after a restart: `revoked_at` is in
  the database and reloaded at boot);
- each `once` nonce must be unused, and is recorded as used (durable used-set);
- each `budget` caveat names a kernel counter; a call is admitted only if every counter it
  charges stays within its limit. A delegated child copies its parent's budget caveats, counter
  ids included, so parent and child draw on one counter and the child can never spend more than
  the parent has left. Counters are exact in memory; the database holds a high-water mark a
  step ahead (1/32 of the limit, at most 4096), written when the count passes it, so a budgeted
  call costs a write only once per step. A clean shutdown writes exact counts (`close`); after
  a crash a counter resumes at its mark: it may lose up to one step, never exceed its limit.

Delegation (`delegate`) mints a child for another principal. The child keeps every caveat of
its parent except the audience, so it is never wider; rules it asks for must also be covered by
every rule set of the parent (the subset rule), or the kernel refuses with EPERM. That rule is
`check_grant` here (over `rules.grantable`), and every room that hands rights on asks it:
spawn, delegation, `fs.share`, remote keys, privilege groups. What the manager keeps on disk
goes through its store (`store.py`: the SQLite tables and the key file).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from kernel.access.rules import Capability, grantable
from kernel.access.store import AccessStore
from kernel.access.tokens import TokenAuthority
from kernel.call import Call, Fault
from kernel.state import write_private
from sdk import abi
from sdk.syscalls import known_op
from sdk.tokens import Rule, TokenError

if TYPE_CHECKING:
    from pathlib import Path

    from kernel.access.audit import AuditLog
    from kernel.config import Config, GroupConfig
    from kernel.db import Database

log = logging.getLogger("kernel.access")

MARK_STEP_MAX = 4096  # budget counts the database may run ahead of the exact count
MAX_DEPTH = 32  # a derivation chain longer than this is refused (tokens cap caveats anyway)
# `agent:ID`, `user:UID`, or another front end's principal (`http:KEY-NAME`); agent names never
# contain a colon.
_PRINCIPAL_RE = re.compile(r"[a-z]+:[A-Za-z0-9_.@-]{1,200}")
_TOOL_FAMILIES = ("tool.", "tools.")


class AccessManager:
    """Holds the token authority (its key rotates here) and what a token cannot hold: the
    chain, revocations, budgets, nonces. It is given what it uses: `agent_named` resolves a
    running agent's name to its id (None if none runs by that name; the one thing it needs
    from the process table, set once that exists), `admin_token` where the admin's token is
    written again when the key rotates (None: not written)."""

    def __init__(self, *, config: Config, db: Database, audit: AuditLog,
                 authority: TokenAuthority, key_path: Path, admin_token: Path | None = None,
                 agent_named: Callable[[str], int | None] = lambda name: None) -> None:
        self.config = config
        self.db = db
        self.audit = audit
        self.authority = authority
        self.admin_token = admin_token
        self.store = AccessStore(db, key_path)
        self.agent_named = agent_named
        self._chains: dict[str, tuple[str, ...]] = {}  # token id -> itself and its ancestors
        self._revoked = self.store.revoked()
        self._used: dict[str, int] = self.store.budgets()
        self._marks = dict(self._used)  # what the database holds: >= the exact count
        self._nonces = self.store.nonces()
        # Called on the loop with the ids of tokens just revoked: services that hold something
        # open on a token's strength (the egress proxy's tunnels) end it there.
        self.watchers: list[Callable[[frozenset[str]], None]] = []

    def recover(self) -> None:
        """At boot no agent is alive, so nothing an agent held may stay usable."""
        for token_id in self.store.unrevoked(agents=True):
            self.revoke(token_id, "kernel", "its agent ended before this boot")

    # --- the per-call check (its stateless half is `Guard.check`) -----------------------------

    def admit(self, cap: Capability, op: str) -> None:
        """Kernel-side state of a verified token whose caveats hold: refuse it if unknown or
        revoked (itself or any ancestor), a used one-shot, or over a budget; else count the use."""
        chain = self._chains.get(cap.token_id) or self._load_chain(cap.token_id)
        if chain is None:
            raise Fault(abi.ErrorCode.EPERM, "unknown token")
        if self._revoked and not self._revoked.isdisjoint(chain):
            raise Fault(abi.ErrorCode.EPERM, "token revoked")
        if cap.nonces and any(n in self._nonces for n in cap.nonces):
            raise Fault(abi.ErrorCode.EPERM, "one-shot token already used")
        if cap.budgets:
            self._charge(cap, "calls", 1)
            if op.startswith(_TOOL_FAMILIES):
                self._charge(cap, "tools", 1)
        for nonce in cap.nonces:
            self._nonces.add(nonce)
            self.store.use_nonce(nonce, cap.token_id, time.time())

    def _load_chain(self, token_id: str) -> tuple[str, ...] | None:
        chain: list[str] = []
        current: str | None = token_id
        while current is not None:
            row = self.store.parent(current)
            if row is None or len(chain) >= MAX_DEPTH or current in chain:
                return None
            chain.append(current)
            current = row[0]
        result = tuple(chain)
        if len(self._chains) > 65536:
            self._chains.clear()
        self._chains[token_id] = result
        return result

    def chain(self, token_id: str) -> tuple[str, ...]:
        """The token and its ancestors: revoking any of them revokes it."""
        return self._chains.get(token_id) or self._load_chain(token_id) or (token_id,)

    def is_revoked(self, token_id: str) -> bool:
        chain = self._chains.get(token_id) or self._load_chain(token_id)
        return chain is None or not self._revoked.isdisjoint(chain)

    # --- budgets ------------------------------------------------------------------------------

    def charge(self, call: Call, kind: str, amount: int | Callable[[], int]) -> None:
        """Count `amount` against the caller's `kind` budgets, or fail with EQUOTA (charging
        nothing). For other managers: `bytes` when they store data (ipc.send charges its
        payload). `calls` and `tools` need no call: `admit` charges every syscall to `calls`
        and every `tool.*`/`tools.*` syscall to `tools`; `llm_tokens` goes through
        `reserve_llm`. `amount` may be a function, evaluated only when the token has such a
        budget."""
        cap = call.capability
        if cap is None or not any(b[0] == kind for b in cap.budgets):
            return
        self._charge(cap, kind, amount() if callable(amount) else amount)

    def _charge(self, cap: Capability, kind: str, amount: int) -> None:
        limits = self._limits(cap, kind)
        for counter, limit in limits.items():
            if self._used.get(counter, 0) + amount > limit:
                raise Fault(abi.ErrorCode.EQUOTA, f"{kind} budget exhausted "
                            f"({self._used.get(counter, 0)} of {limit} used)")
        for counter, limit in limits.items():
            self._add(counter, cap.token_id, amount, limit)

    def reserve(self, cap: Capability, kind: str, want: int) -> int | None:
        """Take up to `want` of the token's `kind` budgets ahead of use, for a service that
        counts as it goes (the egress proxy's bytes): how much was taken, None if the token
        has no such budget, EQUOTA if nothing is left. Give back what goes unused (`refund`)."""
        limits = self._limits(cap, kind)
        if not limits:
            return None
        left = min(limit - self._used.get(counter, 0) for counter, limit in limits.items())
        if left <= 0:
            raise Fault(abi.ErrorCode.EQUOTA, f"{kind} budget exhausted")
        granted = min(want, left)
        for counter, limit in limits.items():
            self._add(counter, cap.token_id, granted, limit)
        return granted

    def refund(self, cap: Capability, kind: str, amount: int) -> None:
        for counter, limit in self._limits(cap, kind).items():
            self._add(counter, cap.token_id, -min(amount, self._used.get(counter, 0)), limit)

    def _limits(self, cap: Capability, kind: str) -> dict[str, int]:
        """Counter -> tightest limit of the token's `kind` budgets. One counter may appear in
        several caveats (a child copies its parent's): it is charged once. Counters live in
        the namespace of the token's derivation tree (its root's id), so writing another
        tree's counter id into a caveat cannot drain that tree's budget."""
        root = (self._chains.get(cap.token_id) or self._load_chain(cap.token_id)
                or (cap.token_id,))[-1]
        limits: dict[str, int] = {}
        for k, limit, counter in cap.budgets:
            if k == kind:
                counter = f"{root}/{counter}"
                limits[counter] = min(limit, limits.get(counter, limit))
        return limits

    def _add(self, counter: str, token_id: str, amount: int, limit: int) -> None:
        used = self._used.get(counter, 0) + amount
        self._used[counter] = used
        if used > self._marks.get(counter, 0):
            mark = min(limit, used + min(MARK_STEP_MAX, limit // 32))
            self._write_mark(counter, token_id, mark)

    def _write_mark(self, counter: str, token_id: str, mark: int) -> None:
        self._marks[counter] = mark
        self.store.write_mark(counter, token_id, mark)

    def close(self) -> None:
        """Write exact budget counts (a clean shutdown gives nothing away)."""
        changed = [(c, used) for c, used in self._used.items() if self._marks.get(c) != used]
        self._marks.update(changed)
        self.store.write_used(changed)

    def reserve_llm(self, call: Call, max_tokens: int) -> None:
        """Reserve `max_tokens` of the caller's `llm_tokens` budgets before a generation starts
        (EQUOTA if that does not fit), and settle to the tokens actually generated when it
        replies. A call that fails keeps its reservation: its tokens may have been streamed."""
        cap = call.capability
        if cap is None or not any(b[0] == "llm_tokens" for b in cap.budgets):
            return
        self._charge(cap, "llm_tokens", max_tokens)

        def settle(result: Any) -> None:
            usage = getattr(result, "usage", None)
            used = getattr(usage, "completion_tokens", max_tokens)
            for counter, limit in self._limits(cap, "llm_tokens").items():
                self._add(counter, cap.token_id, min(used, max_tokens) - max_tokens, limit)

        call.on_reply.append(settle)

    def usage(self, cap: Capability) -> dict[str, list[int]]:
        """kind -> [used, limit] of the tightest budget of each kind."""
        out: dict[str, list[int]] = {}
        for kind in {b[0] for b in cap.budgets}:
            for counter, limit in self._limits(cap, kind).items():
                used = self._used.get(counter, 0)
                if kind not in out or limit - used < out[kind][1] - out[kind][0]:
                    out[kind] = [used, limit]
        return out

    # --- minting and delegation ---------------------------------------------------------------

    def record(self, token: str) -> Capability:
        """Enter a freshly minted token in the derivation tree: only a recorded token is
        admitted, so every token the kernel mints passes here."""
        cap = self.authority.verify(token)
        self.store.record(cap)
        return cap

    def _group(self, name: str | None) -> GroupConfig | None:
        if name is None:
            return None
        group = self.config.groups.get(name)
        if group is None:
            known = ", ".join(self.config.groups) or "none"
            raise Fault(abi.ErrorCode.ENOENT, f"no privilege group {name!r} (configured: {known})")
        return group

    @staticmethod
    def rules(texts: Iterable[str]) -> list[Rule]:
        """Rules `OP[@RESOURCE]` as a caller gives them: EINVAL for bad syntax or an op that
        names no syscall."""
        try:
            rules = [Rule.parse(text) for text in texts]
        except ValueError as exc:
            raise Fault(abi.ErrorCode.EINVAL, f"bad capability: {exc}") from None
        for rule in rules:
            if not known_op(rule.op):
                raise Fault(abi.ErrorCode.EINVAL, f"bad capability {rule}: no syscall {rule.op!r}")
        return rules

    def _extra(self, group: GroupConfig | None, *, budgets: dict[str, int] | None = None,
               once: bool = False, approval: Iterable[str] = ()) -> list[tuple[str, object]]:
        """Caveats for budgets, one-shot and approval, from explicit values and a group."""
        limits = dict(group.budgets) if group else {}
        for kind, limit in (budgets or {}).items():
            limits[kind] = min(limit, limits.get(kind, limit))
        extra: list[tuple[str, object]] = [
            ("budget", [kind, limit, secrets.token_hex(8)]) for kind, limit in limits.items()]
        if once or (group is not None and group.once):
            extra.append(("once", secrets.token_hex(16)))
        held = self.rules([*approval, *(group.requires_approval if group else ())])
        if held:
            extra.append(("requires_approval", held))
        return extra

    def _mint(self, subject: str, rules: list[Rule], *, expires_at: float | None,
              parent_id: str | None, extra: list[tuple[str, object]]) -> tuple[str, Capability]:
        try:
            token = self.authority.mint(subject, rules, expires_at=expires_at,
                                          parent_id=parent_id, extra=extra)
        except ValueError as exc:
            raise Fault(abi.ErrorCode.EINVAL, f"cannot mint: {exc}") from None
        return token, self.record(token)

    @staticmethod
    def check_grant(held: Capability | None, rules: Iterable[Rule],
                    what: str | None = None) -> None:
        """The one subset rule, for every room that hands rights on (spawn, delegate, share,
        remote keys, groups): EPERM unless the holder of `held` holds every rule it grants."""
        rules = list(rules)
        if held is None or not grantable(held, rules):
            what = what or "rights the caller does not hold: " + ", ".join(map(str, rules))
            raise Fault(abi.ErrorCode.EPERM, f"cannot grant {what}")

    def check_group(self, caller_cap: Capability | None, group_name: str | None) -> None:
        """Refuse a group the caller cannot grant, before anything is written."""
        group = self._group(group_name)
        if group is not None:
            self.check_grant(caller_cap, self.rules(group.caps), f"group {group.name!r}: the "
                             "caller does not hold all of its rights")

    def grant_agent(self, agent_id: int, rules: list[Rule],
                    group_name: str | None) -> tuple[str, str]:
        """The token an agent is started (or restarted) with: `rules` plus its privilege
        group's template. The spawner checked that its caller holds every rule of the group
        (`check_group`) before the agent existed."""
        group = self._group(group_name)
        grants = list(rules)
        expires_at = None
        extra: list[tuple[str, object]] = []
        if group is not None:
            grants += self.rules(group.caps)
            expires_at = time.time() + group.ttl if group.ttl else None
            extra = self._extra(group)
        token, cap = self._mint(f"agent:{agent_id}", grants, expires_at=expires_at,
                                parent_id=None, extra=extra)
        return token, cap.token_id

    def mint(self, subject: str, group_name: str | None = None, *, caps: Iterable[str] = (),
             ttl: float | None = None, budgets: dict[str, int] | None = None,
             once: bool = False) -> str:
        """A root token for `subject` (its audience) from a group's template and/or rules, e.g.
        a bearer key for the HTTP front end; it is recorded, so it can be revoked. For kernel
        code: it checks no caller's rights."""
        group = self._group(group_name)
        rules = self.rules([*caps, *(group.caps if group else ())])
        if not rules:
            raise Fault(abi.ErrorCode.EINVAL, "a token needs at least one rule")
        ttl = ttl if ttl is not None else (group.ttl if group else None)
        token, cap = self._mint(subject, rules, expires_at=time.time() + ttl if ttl else None,
                                parent_id=None, extra=self._extra(group, budgets=budgets,
                                                                  once=once))
        self.audit.append("kernel", "grant", token=cap.token_id, subject=subject,
                            group=group_name, rules=[str(r) for r in rules])
        return token

    def _principal(self, to: str) -> str:
        if _PRINCIPAL_RE.fullmatch(to):
            return to
        agent_id = self.agent_named(to)
        if agent_id is None:
            raise Fault(abi.ErrorCode.ENOENT, f"no running agent named {to!r}")
        return f"agent:{agent_id}"

    def _held(self, call: Call, token: str | None, *, usable: bool = True) -> Capability:
        """The parent of a delegation: the call's own token, or another the caller holds."""
        if token is None:
            assert call.capability is not None
            return call.capability
        try:
            cap = self.authority.verify(token)
        except TokenError as exc:
            raise Fault(abi.ErrorCode.EPERM, f"invalid token: {exc.reason}") from None
        if any(aud != call.caller.principal for aud in cap.audiences):
            raise Fault(abi.ErrorCode.EPERM, "that token is not the caller's")
        if usable and self.is_revoked(cap.token_id):
            raise Fault(abi.ErrorCode.EPERM, "the token to delegate is revoked")
        return cap

    def delegate(self, call: Call, args: abi.DelegateArgs) -> abi.Grant:
        parent = self._held(call, args.token)
        to = self._principal(args.to)
        group = self._group(args.group)
        rules = self.rules([*args.caps, *(group.caps if group else ())])
        self.check_grant(parent, rules)
        sets = parent.rule_sets
        child_rules = rules or list(sets[0] if sets else ())
        # Every caveat of the parent but its audience, so the child is never wider.
        inherited = [(kind, value) for kind, value in parent.caveats
                     if kind != "aud" and not (kind == "allow" and not rules and value == sets[0])]
        ttl = args.ttl_s or (group.ttl if group else None)
        expires_at = time.time() + ttl if ttl else None
        extra = inherited + self._extra(group, budgets=args.budgets, once=args.once,
                                        approval=args.requires_approval)
        token, cap = self._mint(to, child_rules, expires_at=expires_at,
                                parent_id=parent.token_id, extra=extra)
        self.audit.append(call.caller.principal, "delegate", parent=parent.token_id,
                            token=cap.token_id, to=to, rules=[str(r) for r in child_rules],
                            budgets=args.budgets, once=args.once, group=args.group)
        return abi.Grant(token=token, id=cap.token_id, audience=to, expires_at=cap.expires_at)

    # --- revocation ---------------------------------------------------------------------------

    def revoke(self, token_id: str, by: str, reason: str) -> int:
        """Revoke a token and every token derived from it; returns how many were newly revoked."""
        tree, frontier = [token_id], [token_id]
        while frontier:
            frontier = self.store.children(frontier)
            tree += frontier
        now = time.time()
        fresh = [t for t in tree if t not in self._revoked]
        for tid in fresh:
            self.store.revoke(tid, now)
        self._revoked.update(tree)
        self.audit.append(by, "revoke", token=token_id, derived=len(tree) - 1, reason=reason)
        self._tell(tree)
        return len(fresh)

    def _tell(self, revoked: Iterable[str]) -> None:
        ids = frozenset(revoked)
        for watcher in self.watchers:
            try:
                watcher(ids)
            except Exception:
                log.exception("revocation watcher failed")

    def revoke_call(self, call: Call, token_id: str) -> int:
        """`caps.revoke`: users may revoke any token; an agent only its own token and the
        tokens derived from it."""
        if not self.store.exists(token_id):
            raise Fault(abi.ErrorCode.ENOENT, f"no token {token_id}")
        if call.caller.agent_id is not None:
            assert call.capability is not None
            chain = self._chains.get(token_id) or self._load_chain(token_id) or ()
            if call.capability.token_id not in chain:
                raise Fault(abi.ErrorCode.EPERM, "an agent may revoke only its own token and "
                            "the tokens derived from it")
        return self.revoke(token_id, call.caller.principal, "caps.revoke")

    def revoke_subject(self, subject: str, by: str, reason: str) -> int:
        """Revoke every token issued to `subject`, and their descendants."""
        return sum(self.revoke(token_id, by, reason)
                   for token_id in self.store.unrevoked(subject))

    def agent_ended(self, agent_id: int) -> None:
        """Killing or reaping an agent revokes every token it held, and their descendants."""
        self.revoke_subject(f"agent:{agent_id}", "kernel", f"agent {agent_id} ended")

    def rotate_key(self, by: str) -> None:
        """Replace the token key: everything signed by the old key stops verifying at once.
        Running agents lose their access with it; a new admin token is written."""
        key = secrets.token_bytes(32)
        self.store.write_key(key)
        self.authority = TokenAuthority(key)
        old = self.store.revoke_all(time.time())
        self._revoked.update(old)
        self._tell(old)
        self.audit.append(by, "rotate-key", key_id=self.authority.key_id.hex(),
                          invalidated=len(old))
        self.write_admin_token()

    def write_admin_token(self) -> None:
        """A fresh `allow *` token for the kernel's own uid, recorded, audited and written to
        the state dir (0600) where the admin's CLI finds it."""
        if self.admin_token is None:
            return
        uid = os.geteuid()
        token = self.authority.mint(f"user:{uid}", [Rule("*")])
        self.record(token)
        self.audit.append("kernel", "grant", subject=f"user:{uid}", rules=["*"],
                          to=self.admin_token.name)
        write_private(self.admin_token, (token + "\n").encode())

    # --- inspection ---------------------------------------------------------------------------

    def info(self, cap: Capability) -> abi.TokenInfo:
        revoked = self.store.revoked_at(cap.token_id)
        if revoked is None and self.is_revoked(cap.token_id):
            revoked = -1.0  # an ancestor was revoked
        return abi.TokenInfo(id=cap.token_id, subject=cap.subject, issued_at=cap.issued_at,
                             parent=cap.parent_id, expires_at=cap.expires_at, revoked_at=revoked,
                             caveats=[describe(kind, value) for kind, value in cap.caveats],
                             budgets=self.usage(cap))

    def inspect(self, call: Call, token: str | None) -> abi.TokenInfo:
        return self.info(self._held(call, token, usable=False))

    def list(self, call: Call, args: abi.ListTokensArgs) -> list[abi.TokenInfo]:
        """Users see every token; an agent sees its own token's derivation tree."""
        rows = self.store.tokens(live_at=None if args.all else time.time(),
                                 subject=args.subject)
        if call.caller.agent_id is not None:
            assert call.capability is not None
            mine = call.capability.token_id
            rows = [r for r in rows if mine in (self._chains.get(r[0])
                                                or self._load_chain(r[0]) or ())]
        return [abi.TokenInfo(id=i, parent=p, subject=s, issued_at=at, expires_at=exp,
                              revoked_at=rev) for i, p, s, at, exp, rev in rows[:args.limit]]


def describe(kind: str, value: object) -> str:
    """One caveat as text, for people."""
    if kind in ("allow", "requires_approval"):
        return f"{kind} " + " ".join(str(r) for r in value)  # type: ignore[attr-defined]
    if kind == "budget":
        budget_kind, limit, bid = value  # type: ignore[misc]
        return f"budget {budget_kind}={limit} (counter {bid})"
    if kind in ("exp", "nbf"):
        return f"{kind} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(value))}"  # type: ignore[arg-type]
    return f"{kind} {value}"
