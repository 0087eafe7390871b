"""Asks the default model one greedy question; returns the reply, or the error code."""

import sdk
from sdk import Agent


class Chatter(Agent):
    def run(self, task: str) -> str:
        try:
            reply = self.llm.chat([{"role": "user", "content": "hello there"}], max_tokens=16)
        except sdk.SyscallError as exc:
            return exc.code.name
        return reply.message.content
