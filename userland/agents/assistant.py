"""An assistant whose conversation outlives it and the kernel: the history is kept in its
memory and reloaded at every start.

    agentos run --cap llm.chat userland/agents/assistant.py -- "My name is Ada."
    agentos run --cap llm.chat userland/agents/assistant.py -- "What is my name?"

Run it again under the same name (`assistant` by default, the file's stem), after the kernel
restarted or not, and it carries on: each turn is in its memory (`agent/<name>`, through
`sdk.memory.Conversation`) before the reply is returned. No task: it prints the history.
Options before the message: `--model NAME` (default: the kernel's default), `--conversation
NAME` (several per agent, default "default"), `--window N` (the newest N messages go to the
model, default 12; older ones that match the new message are recalled by memory search),
`--max-tokens N` (default 128).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sdk import Agent
from sdk.memory import Conversation

SYSTEM = "You are a helpful assistant. Answer briefly."


def options(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="assistant.py")
    parser.add_argument("--model", help="model to use (default: the kernel's default)")
    parser.add_argument("--conversation", default="default")
    parser.add_argument("--window", type=int, default=12, help="newest messages sent")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("message", nargs="*")
    return parser.parse_args(argv)


class Assistant(Agent):
    def run(self, task: str) -> dict[str, Any]:
        opts = options(sys.argv[1:])
        text = " ".join(opts.message)
        chat = Conversation(self.memory, opts.conversation)  # reloads what was said before
        remembered = len(chat.messages)
        if not text:
            return {"conversation": opts.conversation, "history": chat.messages}
        recent = chat.messages[-opts.window:] if opts.window > 0 else []
        system, recalled = SYSTEM, []
        if remembered > len(recent):
            # Older than the window: bring back what matches this message.
            shown = {f"{m['role']}: {m['content']}" for m in recent}
            hits = self.memory.search(text, k=3, filter={"kind": "chat",
                                                         "conversation": opts.conversation})
            recalled = [h.content for h in hits if h.content not in shown]
            if recalled:
                system += "\nEarlier in this conversation:\n" + "\n".join(recalled)
        chat.append("user", text)  # durable first: a crash mid-reply keeps the question
        messages = [{"role": "system", "content": system}, *recent,
                    {"role": "user", "content": text}]
        reply = self.llm.chat(messages, model=opts.model, max_tokens=opts.max_tokens)
        answer = reply.message.content or ""
        chat.append("assistant", answer)
        print(answer, flush=True)
        return {"reply": answer, "remembered": remembered, "recalled": len(recalled),
                "sent": len(messages), "turns": len(chat.messages) // 2}
