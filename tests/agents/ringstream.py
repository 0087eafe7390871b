"""Streams a chat over its ring, abandons a second stream early, then chats once more."""

from sdk import Agent

HELLO = [{"role": "user", "content": "hello there"}]


class RingStream(Agent):
    def run(self, task: str) -> dict:
        stream = self.llm.stream(HELLO, max_tokens=20, temperature=0.8, seed=7)
        deltas = [d.text for d in stream]
        with self.llm.stream(HELLO, max_tokens=2000) as long:
            for _ in long:
                break  # leaving early cancels it, through the ring
        again = self.llm.chat(HELLO, max_tokens=20, temperature=0.8, seed=7)
        return {"rings": self.conn.uses_rings, "deltas": len(deltas),
                "joined": "".join(deltas), "result": stream.result.message.content,
                "again": again.message.content}
