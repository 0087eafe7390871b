"""Agent names are owned: who may start an agent under a name that already has a past.

An agent's files (`fs/agent/<name>`), memories (`mem/agent/<name>`) and mailbox (`ipc/<name>`)
are keyed by its name, so that the same agent finds them again, and every agent's baseline
grants it those of its own name. A name is therefore an identity: whoever may start an agent
under it gets that state and that mail. So the kernel records, durably (table `names`), which
principal owns each name ever used: the last one that started an agent under it. `proc.spawn`
under a name is allowed when

- the name is fresh: no agent ever had it and nothing is stored under it; the spawner claims it;
- the caller owns it (the admin running its agent again, a parent re-running its worker); or
- the caller holds every right the name gives (`rights(name)`): it could reach that state
  anyway, so spawning grants nothing it does not hold, as for any other capability (the
  admin's `*` holds them; an owner shares a name by granting them). The caller then owns it.

Anything else is EPERM, whether the name's agent is alive or long gone. A restart (a policy,
or a new kernel reconciling the table) is the same agent under its id, not a spawn: it keeps
its name and state.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from kernel.access.rules import Capability, grantable
from kernel.call import Fault
from sdk import abi
from sdk.tokens import Rule

if TYPE_CHECKING:
    from kernel.access.guard import Guard
    from kernel.db import Database
    from kernel.memory.manager import MemoryManager


def rights(name: str) -> list[Rule]:
    """The name-scoped part of an agent's baseline: its own files and memories."""
    return [Rule("memory.*", f"mem/agent/{name}"), Rule("fs.*", f"fs/agent/{name}")]


class Names:
    def __init__(self, *, db: Database, guard: Guard, memory: MemoryManager) -> None:
        self.db = db
        self.guard = guard
        self.memory = memory

    def owner(self, name: str) -> str | None:
        rows = self.db.read("SELECT owner FROM names WHERE name=?", (name,))
        return rows[0][0] if rows else None

    def _has_state(self, name: str) -> bool:
        """Whether files or memories are kept under the name (written by a holder of rights on
        it before any agent had the name): then it is not fresh."""
        if self.memory.stored(f"agent/{name}") > 0:
            return True
        return bool(self.db.read("SELECT 1 FROM fs_files WHERE owner=? LIMIT 1", (name,)))

    def check(self, principal: str, cap: Capability, name: str) -> None:
        """Refuse (EPERM) a spawn under `name` that would hand its caller someone else's
        files, memories or mail."""
        owner = self.owner(name)
        if owner == principal or (owner is None and not self._has_state(name)):
            return
        wanted = rights(name)
        if grantable(cap, wanted):
            return
        # The audit says whose it is; the caller learns only that it is not its own.
        whose = f"belongs to {owner}" if owner else "has files or memories"
        self.guard.deny(principal, "proc.spawn", f"name/{name}", f"the name {whose}",
                          token_id=cap.token_id)  # audited, rate-limited per principal
        raise Fault(abi.ErrorCode.EPERM, f"the agent name {name!r} is taken; choose another, "
                     "or hold " + " and ".join(map(str, wanted)) + " to run it")

    def claim(self, name: str, principal: str, agent_id: int) -> None:
        self.db.write("INSERT INTO names (name, owner, agent_id, claimed_at) VALUES (?,?,?,?) "
                        "ON CONFLICT(name) DO UPDATE SET owner=excluded.owner, "
                        "agent_id=excluded.agent_id, claimed_at=excluded.claimed_at",
                        (name, principal, agent_id, time.time()))
