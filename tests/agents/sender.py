"""Sends its task's second word to the agent named by its first word."""

from sdk import Agent


class Sender(Agent):
    def run(self, task: str) -> str:
        to, data = task.split(" ", 1)
        self.ipc.send(to, data)
        return "sent"
