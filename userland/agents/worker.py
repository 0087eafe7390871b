"""A planner's worker: takes one subtask from its planner over ipc, answers it with the model
access the planner delegated along with it, mails the answer back, and exits.

planner.py starts it as `worker.py PLANNER` (the planner's principal, `agent:ID`) with no
capabilities beyond every agent's own; everything else it may do comes in the job message
as a token bound to this worker: `llm.chat` on one model within a token budget, and
`ipc.send` to the planner, expiring at the planner's deadline.
"""

from __future__ import annotations

import time
from typing import Any

from sdk import Agent, Connection, SyscallError, TimedOut, TryAgain

WAIT_FOR_JOB = 60.0  # seconds: a planner that spawned us and never wrote has failed


class Worker(Agent):
    def run(self, task: str) -> dict[str, Any]:
        planner = task.strip()
        give_up = time.monotonic() + WAIT_FOR_JOB
        while True:
            try:
                message = self.ipc.recv(timeout=max(0.0, give_up - time.monotonic()))
            except (TimedOut, TryAgain):  # TryAgain: asked with no time left
                return {"error": "ETIMEDOUT", "message": "no job from the planner"}
            # Only the planner that started us gives orders; anything else is dropped.
            if message.sender == planner and isinstance(message.data, dict):
                break
        job = message.data
        left = job["deadline"] - time.time()  # wall clock: the planner's and ours agree
        out: dict[str, Any] = {"index": job["index"]}
        # The delegated token goes on a connection of its own; our own token stays as it was.
        with Connection(self.conn.endpoint, job["token"], timeout=max(1.0, left)) as granted:
            try:
                reply = granted.llm.chat([{"role": "user", "content": job["subtask"]}],
                                         model=job["model"], max_tokens=job["max_tokens"],
                                         timeout=max(0.0, left))
                out["answer"] = reply.message.content or ""
            except SyscallError as exc:  # out of budget, past the deadline, model gone, ...
                out.update(error=exc.code.name, message=exc.message)
            try:
                granted.ipc.send(job["reply_to"], out)
            except SyscallError as exc:  # the planner is gone or its grant revoked
                out["undelivered"] = exc.code.name
        return out
