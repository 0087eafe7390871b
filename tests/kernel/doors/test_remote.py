"""Remote agents over tcp:// with CurveZMQ: identity from the client's key, through the CLI."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import sdk
from sdk.remote import CurveKeys, keygen
from tests.conftest import KernelProcess, agent


@pytest.fixture(scope="module")
def tk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    k = KernelProcess(tmp_path_factory.mktemp("remote") / "state")
    k.extra_args = ["--listen", "tcp://127.0.0.1:0"]  # the kernel binds a port; grants name it
    k.start()
    yield k
    assert k.stop() == 0


def add_key(k: KernelProcess, name: str, public: str, *caps: str) -> dict:
    # "--": a Z85 key may begin with "-" (one in 85), which argparse would take for an option.
    out = k.cli("agent", "add-key", *(f"--cap={c}" for c in caps), "--json", "--", name, public)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_registered_key_is_its_principal(tk: KernelProcess) -> None:
    public, secret = keygen()
    grant = add_key(tk, "laptop", public, "proc.ps")
    assert grant["principal"] == "remote:laptop" and grant["endpoint"].startswith("tcp://")
    assert stat.S_IMODE((tk.state_dir / "remote" / "server.key").stat().st_mode) == 0o600
    keys = CurveKeys(grant["server_key"], public, secret)
    with sdk.connect(grant["endpoint"], grant["token"], curve=keys, timeout=10) as conn:
        assert conn.sys.null() is None
        with tk.connect() as admin:
            aid = admin.proc.spawn(agent("exits"), argv=["0"], name="seen-remotely")
            admin.proc.wait(aid, timeout=30)
            assert conn.proc.ps() == admin.proc.ps()  # the same table, over either door
        assert aid in [a.id for a in conn.proc.ps()]
        with pytest.raises(sdk.PermissionDenied):
            conn.proc.kill(1)  # not granted
    # The admin's token names user:<uid>; over this key the caller is remote:laptop.
    admin_token = (tk.state_dir / "admin.token").read_text().strip()
    with sdk.connect(grant["endpoint"], admin_token, curve=keys, timeout=10) as conn:
        with pytest.raises(sdk.PermissionDenied):
            conn.sys.null()
    # And the remote token is worthless on the local socket, where the caller is a user.
    with sdk.connect(state_dir=tk.state_dir, token=grant["token"], timeout=10) as conn:
        with pytest.raises(sdk.PermissionDenied):
            conn.sys.null()


async def _async_null(endpoint: str, token: str, keys: CurveKeys) -> None:
    async with sdk.connect_async(endpoint, token, curve=keys, timeout=10) as conn:
        assert await conn.sys.null() is None


def test_asyncio_client_over_curve(tk: KernelProcess) -> None:
    import asyncio

    public, secret = keygen()
    grant = add_key(tk, "aio", public)
    asyncio.run(_async_null(grant["endpoint"], grant["token"],
                            CurveKeys(grant["server_key"], public, secret)))


def test_unknown_and_removed_keys_are_refused(tk: KernelProcess) -> None:
    public, secret = keygen()
    grant = add_key(tk, "phone", public)
    server, endpoint, token = grant["server_key"], grant["endpoint"], grant["token"]
    stranger = CurveKeys(server, *keygen())
    with sdk.connect(endpoint, token, curve=stranger, timeout=1.5) as conn:
        with pytest.raises(sdk.KernelUnavailable):
            conn.sys.null()  # refused at the handshake: no message ever reaches the kernel
    keys = CurveKeys(server, public, secret)
    with sdk.connect(endpoint, token, curve=keys, timeout=10) as conn:
        conn.sys.null()
        listed = tk.cli("agent", "list-keys", "--json")
        assert {"name": "phone", "key": public, "principal": "remote:phone"} in json.loads(
            listed.stdout)
        assert tk.cli("agent", "rm-key", "phone").returncode == 0
        with pytest.raises(sdk.PermissionDenied):
            conn.sys.null()  # an open connection loses its calls at once
    with sdk.connect(endpoint, token, curve=keys, timeout=1.5) as conn:
        with pytest.raises(sdk.KernelUnavailable):
            conn.sys.null()
    assert tk.cli("agent", "rm-key", "phone").returncode == 1  # ENOENT


def test_removing_a_key_revokes_its_tokens(tk: KernelProcess) -> None:
    """A name registered again (even with the same key) gets a new token; the old one is dead."""
    public, secret = keygen()
    old = add_key(tk, "tablet", public)
    assert tk.cli("agent", "rm-key", "tablet").returncode == 0
    new = add_key(tk, "tablet", public)
    keys = CurveKeys(new["server_key"], public, secret)
    with sdk.connect(new["endpoint"], new["token"], curve=keys, timeout=10) as conn:
        assert conn.sys.null() is None
    with sdk.connect(old["endpoint"], old["token"], curve=keys, timeout=10) as conn:
        with pytest.raises(sdk.PermissionDenied):
            conn.sys.null()


def test_a_remote_client_has_its_own_memory_namespace(tk: KernelProcess) -> None:
    """`remote/<name>`, never the local user's `user/<name>` of the same name."""
    public, secret = keygen()
    grant = add_key(tk, "desk", public, "memory.*@mem/remote/desk")
    keys = CurveKeys(grant["server_key"], public, secret)
    with sdk.connect(grant["endpoint"], grant["token"], curve=keys, timeout=10) as conn:
        mid = conn.memory.add("from the desk")
        assert conn.memory.get(mid).namespace == "remote/desk"
        with pytest.raises(sdk.PermissionDenied):
            conn.memory.add("x", namespace="user/desk")


def test_no_tcp_endpoint_unless_configured(tmp_path: Path) -> None:
    k = KernelProcess(tmp_path / "state").start()
    try:
        public, _ = keygen()
        assert add_key(k, "x", public)["endpoint"] is None
    finally:
        assert k.stop() == 0
