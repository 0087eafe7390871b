"""Keeps a conversation in the memory manager: appends its task as a user turn (if any) and
returns the whole history, as a restarted agent would see it."""

from sdk import Agent
from sdk.memory import Conversation


class Convo(Agent):
    def run(self, task: str) -> list:
        conversation = Conversation(self.memory, "chat")
        if task:
            conversation.append("user", task)
            conversation.append("assistant", f"noted: {task}")
        return conversation.messages
