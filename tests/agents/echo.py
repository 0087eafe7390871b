"""Receives one message and returns it (with its sender)."""

from sdk import Agent


class Echo(Agent):
    def run(self, task: str) -> dict:
        msg = self.ipc.recv(timeout=float(task or 20))
        return {"from": msg.sender, "data": msg.data}
