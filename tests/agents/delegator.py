"""Delegates a read-only, path-limited, 5-call capability to the agent named by its task, then
revokes it when that agent says it has used it."""

from sdk import Agent


class Delegator(Agent):
    def run(self, task: str) -> dict:
        grant = self.caps.delegate(task, [f"proc.info@proc/{self.id}"], budgets={"calls": 5})
        self.ipc.send(task, {"token": grant.token})
        self.ipc.recv(timeout=30)  # "used"
        revoked = self.caps.revoke(grant.id)
        self.ipc.send(task, "revoked")
        return {"child": grant.id, "revoked": revoked}
