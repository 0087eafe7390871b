"""Hostile: sends `n` concurrent chats whose prompt is `size` bytes (task: "N SIZE"); returns,
per chat, its error code (or "ok") and the seconds it took to be answered."""

import asyncio
import time

import sdk
from sdk import Agent


class BigPrompt(Agent):
    async def run(self, task: str) -> list:
        n, size = (int(x) for x in task.split())
        words = "the agent calls a tool and reads the answer 0123456789 "
        text = (words * (size // len(words) + 1))[:size]
        # A message holds at most 1 MiB (the ABI): the prompt is as many messages as it takes.
        piece = 1 << 20
        messages = [{"role": "user", "content": text[i:i + piece]}
                    for i in range(0, len(text), piece)]

        async def one() -> list:
            started = time.monotonic()
            try:
                await self.llm.chat(messages, max_tokens=4)
                code = "ok"
            except sdk.SyscallError as exc:
                code = exc.code.name
            return [code, round(time.monotonic() - started, 3)]

        return list(await asyncio.gather(*(one() for _ in range(n))))
