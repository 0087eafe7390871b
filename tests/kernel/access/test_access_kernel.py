"""The access manager in a live kernel: agents delegating and revoking, budgets under
concurrency, approvals, privilege groups, restart durability, key rotation and the audit CLI."""

from __future__ import annotations

import calendar
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import sdk
from tests.conftest import KernelProcess, agent, wait_until

CONFIG = """
[kernel]
approval_timeout = 4

[groups.researcher]
caps = ["proc.ps", "sys.*"]
ttl = 600

[groups.grouped]
caps = ["caps.inspect", "sys.*"]
ttl = 600
budgets = { bytes = 100 }

[groups.careful]
caps = ["ipc.send@ipc/"]
requires_approval = ["ipc.send"]
"""


@pytest.fixture(scope="module")
def akernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    root = tmp_path_factory.mktemp("access")
    (root / "kernel.toml").write_text(CONFIG)
    k = KernelProcess(root / "state")
    k.extra_args = ["--config", str(root / "kernel.toml")]
    k.start()
    yield k
    k.stop()


@pytest.fixture
def admin(akernel: KernelProcess) -> Iterator[sdk.Connection]:
    with akernel.connect() as conn:
        yield conn


def test_agent_delegates_a_limited_capability_then_revokes_it(admin: sdk.Connection) -> None:
    b = admin.proc.spawn(agent("delegatee"), name="deleg-b", argv=["deleg-a"],
                         caps=["ipc.send@ipc/deleg-a"])
    a = admin.proc.spawn(agent("delegator"), name="deleg-a", argv=["deleg-b"],
                         caps=["caps.delegate", "caps.revoke", "proc.info@proc/",
                               "ipc.send@ipc/deleg-b"])
    got_a = admin.proc.wait(a, timeout=60)
    got_b = admin.proc.wait(b, timeout=60)
    assert got_a.exit_status == 0 and got_b.exit_status == 0, admin.proc.logs(b, "stderr").data
    assert got_b.result["reads"] == ["ok"] * 5 + ["EQUOTA"]
    assert got_b.result["outside"] == ["EPERM"] * 4
    assert got_b.result["after"].startswith("EPERM") and "revoked" in got_b.result["after"]
    assert got_a.result["revoked"] == 1
    # Both agents have ended: every token they held is revoked.
    for agent_id in (a, b):
        held = admin.caps.list(subject=f"agent:{agent_id}", all=True)
        assert held and all(t.revoked_at for t in held)


def test_budget_is_never_exceeded_under_concurrent_use(akernel: KernelProcess,
                                                       admin: sdk.Connection) -> None:
    me = admin.caps.inspect().subject
    grant = admin.caps.delegate(me, ["sys.null"], budgets={"calls": 25})
    ok = []

    def hammer() -> None:
        with sdk.connect(token=grant.token, state_dir=akernel.state_dir) as conn:
            while True:
                try:
                    conn.sys.null()
                except sdk.QuotaExceeded:
                    return
                ok.append(1)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(ok) == 25
    assert admin.caps.inspect(grant.token).budgets["calls"] == [25, 25]


def test_killing_an_agent_revokes_its_token(admin: sdk.Connection) -> None:
    victim = admin.proc.spawn(agent("blocker"), name="revoked-on-kill")
    assert wait_until(lambda: admin.proc.logs(victim).data == b"blocking\n")
    [live] = admin.caps.list(subject=f"agent:{victim}")
    admin.proc.kill(victim, grace=0)
    admin.proc.wait(victim, timeout=30)
    assert admin.caps.list(subject=f"agent:{victim}") == []
    [dead] = admin.caps.list(subject=f"agent:{victim}", all=True)
    assert dead.id == live.id and dead.revoked_at


def test_group_template_is_granted_at_spawn(akernel: KernelProcess, admin: sdk.Connection) -> None:
    run = akernel.cli("run", "--group", "grouped", "--wait", agent("grouped"))
    assert run.returncode == 0, run.stderr
    aud, allow, exp, budget = json.loads(run.stdout)  # the caveats, in order
    agent_id = int(aud.removeprefix("aud agent:"))
    # Every agent's own rules, then the group's template: nothing else.
    assert allow.split() == ["allow", "sys.*", "proc.exit", f"proc.info@proc/{agent_id}",
                             "ipc.recv", "memory.*@mem/agent/grouped", "fs.*@fs/agent/grouped",
                             "caps.inspect", "sys.*"]
    expires = calendar.timegm(time.strptime(exp, "exp %Y-%m-%dT%H:%M:%SZ"))
    assert 0 < expires - time.time() <= 600  # the group's ttl
    assert budget.startswith("budget bytes=100 (counter ")
    bad = akernel.cli("run", "--group", "nonesuch", agent("grouped"))
    assert bad.returncode == 1 and "ENOENT" in bad.stderr


def test_token_mint_and_revoke_from_the_cli(akernel: KernelProcess) -> None:
    minted = akernel.cli("token", "mint", "--group", "researcher", "--ttl", "60")
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    with sdk.connect(token=token, state_dir=akernel.state_dir) as conn:
        conn.proc.ps()
        with pytest.raises(sdk.PermissionDenied):
            conn.proc.spawn(agent("exits"))
        info = akernel.cli("caps", "inspect", token, "--json")
        token_id = info.stdout.split('"id": "')[1][:32]
        revoked = akernel.cli("caps", "revoke", token_id)
        assert revoked.returncode == 0 and "revoked 1" in revoked.stdout
        with pytest.raises(sdk.PermissionDenied, match="revoked"):
            conn.proc.ps()


def _pending(admin: sdk.Connection, principal: str) -> int:
    assert wait_until(lambda: any(r.principal == principal for r in admin.approvals.list()),
                      timeout=20)
    return next(r.id for r in admin.approvals.list() if r.principal == principal)


def test_approval_approve_deny_and_self_approval(akernel: KernelProcess,
                                                 admin: sdk.Connection) -> None:
    echo = admin.proc.spawn(agent("echo"), name="appr-echo", argv=["30"])
    asker = admin.proc.spawn(agent("asker"), name="appr-ask", argv=["appr-echo", "hi"],
                             group="careful")
    request = _pending(admin, f"agent:{asker}")
    assert admin.proc.info(asker).state == "running"  # blocked in ipc.send
    listing = akernel.cli("approvals")
    assert str(request) in listing.stdout and "ipc.send" in listing.stdout
    approved = akernel.cli("approve", str(request))
    assert approved.returncode == 0, approved.stderr
    assert admin.proc.wait(asker, timeout=30).result == "sent"
    assert admin.proc.wait(echo, timeout=30).result["data"] == "hi"

    echo = admin.proc.spawn(agent("echo"), name="appr-echo", argv=["30"])
    asker = admin.proc.spawn(agent("asker"), name="appr-ask", argv=["appr-echo", "no"],
                             group="careful")
    request = _pending(admin, f"agent:{asker}")
    denied = akernel.cli("deny", str(request), "--reason", "not today")
    assert denied.returncode == 0, denied.stderr
    assert admin.proc.wait(asker, timeout=30).result == "EPERM"
    admin.proc.kill(echo, grace=0)
    assert akernel.cli("approve", str(request)).returncode == 1  # no longer pending


def test_approval_times_out_and_nobody_approves_their_own(akernel: KernelProcess,
                                                          admin: sdk.Connection) -> None:
    echo = admin.proc.spawn(agent("echo"), name="appr-self", argv=["30"])
    wait_until(lambda: admin.proc.info(echo).state == "running")
    me = admin.caps.inspect().subject
    held = admin.caps.delegate(me, ["ipc.send@ipc/appr-self"], requires_approval=["ipc.send"])
    outcome: list[BaseException] = []

    def send() -> None:
        with sdk.connect(token=held.token, state_dir=akernel.state_dir) as conn:
            try:
                conn.ipc.send("appr-self", "mine")
            except sdk.SyscallError as exc:
                outcome.append(exc)

    thread = threading.Thread(target=send)
    thread.start()
    request = _pending(admin, me)
    with pytest.raises(sdk.PermissionDenied, match="own request"):
        admin.approvals.approve(request)
    with pytest.raises(sdk.PermissionDenied, match="own request"):
        admin.approvals.deny(request)
    thread.join(20)
    assert len(outcome) == 1 and isinstance(outcome[0], sdk.TimedOut)
    admin.proc.kill(echo, grace=0)
    events = [r.event for r in admin.audit.read()]
    assert {"approval-request", "approval-refused", "approval-timeout"} <= set(events)


def test_revocation_one_shot_and_rotation_survive_restart(fresh_kernel: KernelProcess) -> None:
    fresh_kernel.start()
    with fresh_kernel.connect() as admin:
        me = admin.caps.inspect().subject
        doomed = admin.caps.delegate(me, ["sys.null"])
        once = admin.caps.delegate(me, ["sys.null"], once=True)
        kept = admin.caps.delegate(me, ["sys.null"])
        admin.caps.revoke(doomed.id)
        with sdk.connect(token=once.token, state_dir=fresh_kernel.state_dir) as conn:
            conn.sys.null()
    fresh_kernel.stop()
    fresh_kernel.start()
    state = fresh_kernel.state_dir
    for token, expect in [(doomed.token, "revoked"), (once.token, "one-shot")]:
        with sdk.connect(token=token, state_dir=state) as conn, \
                pytest.raises(sdk.PermissionDenied, match=expect):
            conn.sys.null()
    with sdk.connect(token=kept.token, state_dir=state) as conn:
        conn.sys.null()
    old_admin = (state / "admin.token").read_text().strip()
    rotated = fresh_kernel.cli("caps", "rotate-key")
    assert rotated.returncode == 0, rotated.stderr
    for token in (kept.token, old_admin):
        with sdk.connect(token=token, state_dir=state) as conn, \
                pytest.raises(sdk.PermissionDenied, match="unknown key"):
            conn.sys.null()
    assert fresh_kernel.cli("ping").returncode == 0  # the new admin token works


def test_audit_cli_shows_and_verifies_and_detects_truncation(fresh_kernel: KernelProcess) -> None:
    fresh_kernel.start()
    state: Path = fresh_kernel.state_dir
    with fresh_kernel.connect() as admin:
        grant = admin.caps.delegate(admin.caps.inspect().subject, ["sys.null"])
        admin.caps.revoke(grant.id)
    shown = fresh_kernel.cli("audit")
    assert shown.returncode == 0 and "delegate" in shown.stdout and "revoke" in shown.stdout
    verified = fresh_kernel.cli("audit", "--verify")
    assert verified.returncode == 0 and "intact" in verified.stdout
    quick = fresh_kernel.cli("audit", "--verify", "--quick")  # from the checkpoint just left
    assert quick.returncode == 0 and "intact" in quick.stdout
    assert (state / "audit.verified").exists()
    db = sqlite3.connect(state / "kernel.db")
    db.execute("DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)")
    db.commit()
    truncated = fresh_kernel.cli("audit", "--verify")
    assert truncated.returncode == 1 and "TAMPERED" in truncated.stdout
    db.execute("UPDATE audit SET detail = '{}' WHERE seq = 1")
    db.commit()
    db.close()
    edited = fresh_kernel.cli("audit", "--verify", "--json")
    assert edited.returncode == 1 and '"broken_at": 1' in edited.stdout



def test_caps_export_signs_the_presented_token(akernel: KernelProcess,
                                               admin: sdk.Connection) -> None:
    """`caps.export` (SDK and CLI): an Ed25519 snapshot of the caller's own token, for its own
    principal, that verifies with the one public key and allows no more than that token."""
    from kernel.access.export import check_export, verify_export
    from sdk.caps import attenuate

    me = f"user:{os.getuid()}"
    start = admin.audit.verify().rows  # audit seqs run 1..rows
    exported = admin.caps.export(ttl=30)
    claims = verify_export(exported.token, exported.public_key)
    admin_id = claims["tid"]
    assert claims["aud"] == [me] and 0 < claims["exp"] - time.time() <= 30
    assert check_export(claims, "proc.kill", "proc/1", me) is None  # the admin's "*"
    assert check_export(claims, "proc.kill", "proc/1", "agent:1") == "audience mismatch"
    admin_token = (akernel.state_dir / "admin.token").read_text().strip()
    narrow = attenuate(admin_token, caps=["caps.export", "sys.null"], ttl=20)
    with sdk.connect(state_dir=akernel.state_dir, token=narrow, timeout=10) as conn:
        small = conn.caps.export(ttl=3600)
    claims = verify_export(small.token, small.public_key)
    assert small.public_key == exported.public_key  # one signing key per kernel
    assert claims["exp"] - time.time() <= 20  # never outlives the token it snapshots
    assert check_export(claims, "sys.null", None, me) is None
    assert check_export(claims, "proc.kill", "proc/1", me) == "not allowed: proc.kill@proc/1"
    out = akernel.cli("caps", "export", "--ttl", "60", "--json")
    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout)
    assert cli["public_key"] == exported.public_key
    assert verify_export(cli["token"], cli["public_key"])["tid"] == admin_id
    assert (akernel.state_dir / "export.key").stat().st_mode & 0o077 == 0
    recorded = [r for r in admin.audit.read(since=start) if r.event == "export"]
    assert [(r.principal, r.detail["token"]) for r in recorded] == [(me, admin_id)] * 3
