"""Receives a delegated token, probes what it allows, then tries again after its revocation."""

import sdk
from sdk import Agent


def attempt(fn) -> str:
    try:
        fn()
        return "ok"
    except sdk.SyscallError as exc:
        return exc.code.name


class Delegatee(Agent):
    def run(self, task: str) -> dict:
        msg = self.ipc.recv(timeout=30)
        giver = msg.sender_id
        with sdk.connect(token=msg.data["token"]) as conn:
            reads = [attempt(lambda: conn.proc.info(giver)) for _ in range(2)]
            outside = [attempt(lambda: conn.proc.info(self.id)), attempt(lambda: conn.proc.ps()),
                       attempt(lambda: conn.proc.kill(giver)),
                       attempt(lambda: conn.ipc.send(task, "x"))]
            reads += [attempt(lambda: conn.proc.info(giver)) for _ in range(4)]
            self.ipc.send(task, "used")
            self.ipc.recv(timeout=30)  # "revoked"
            try:
                conn.proc.info(giver)
                after = "ok"
            except sdk.SyscallError as exc:
                after = f"{exc.code.name}: {exc.message}"
        return {"reads": reads, "outside": outside, "after": after}
