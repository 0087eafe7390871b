"""A planner: splits a task into subtasks, gives each to a worker agent of its own that holds
only what that subtask needs, gathers their answers by a deadline, and combines them.

    agentos run --cap llm.chat --cap llm.models --cap proc.spawn --cap proc.info \
        --cap caps.delegate --cap ipc.send@ipc/ userland/agents/planner.py \
        -- "Describe the sun, the moon and the stars."

Options before the task: `--model NAME` (default: the kernel's default, which it asks for
with `llm.models`), `--workers N` (at most, default 3), `--deadline SECONDS` (default 300),
`--max-tokens N` (per model call, default 64). Subtasks given as `a | b | c` are used as they
are; otherwise the model splits the task.

What it hands on: each worker (worker.py, beside this file) starts with no rights of its
own, under a fresh name derived from the planner's (names are owned, so a name a previous
run used is not the planner's to take); its job arrives by ipc with a token delegated to it
alone: `llm.chat` on one model within a budget of max-tokens, and `ipc.send` back to the
planner, expiring at the deadline, and revoked with the planner's own when it ends. The
planner needs `ipc.send@ipc/` because its workers' names exist only at run time, and
`proc.info` to see a worker die: a dead worker is reported as soon as it is seen (ECANCELED),
one that never answers at the deadline (ETIMEDOUT); the others' answers are kept.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

from sdk import Agent, ErrorCode, SyscallError, TimedOut, TryAgain

WORKER = str(Path(__file__).resolve().with_name("worker.py"))
LIVE = ("starting", "running", "suspended", "restarting")
POLL = 0.5  # seconds between looks at the workers while the mailbox is quiet

# How to split a task, shown rather than explained: small models copy examples.
SPLIT = [
    ("system", "Split the task into at most {n} independent subtasks, one per line."),
    ("user", "Task: Describe the sun, the moon and the stars."),
    ("assistant", "1. Describe the sun.\n2. Describe the moon.\n3. Describe the stars."),
    ("user", "Task: Compare tea and coffee."),
    ("assistant", "1. Describe tea.\n2. Describe coffee."),
]
ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*])\s*(.+?)\s*$", re.MULTILINE)


def options(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="planner.py")
    parser.add_argument("--model", help="model to use (default: the kernel's default)")
    parser.add_argument("--workers", type=int, default=3, help="at most this many subtasks")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds for the workers")
    parser.add_argument("--max-tokens", type=int, default=64, help="per model call")
    parser.add_argument("task", nargs="+")
    return parser.parse_args(argv)


class Planner(Agent):
    def run(self, task: str) -> dict[str, Any]:
        opts = options(sys.argv[1:])
        task = " ".join(opts.task)
        model = opts.model or next(m.name for m in self.llm.models() if m.default)
        subtasks = self.plan(task, model, opts)
        # One deadline for all: the workers get it as wall-clock time, the planner waits by
        # the monotonic clock.
        deadline, wall = time.monotonic() + opts.deadline, time.time() + opts.deadline
        crew = [self.start(i, subtask, model, wall, opts) for i, subtask in enumerate(subtasks)]
        self.gather(crew, deadline)
        answers = [w for w in crew if "answer" in w]
        answer = self.combine(task, answers, model, opts) if answers else None
        return {"task": task, "model": model, "answer": answer, "workers": crew,
                "failed": len(crew) - len(answers)}

    def plan(self, task: str, model: str, opts: argparse.Namespace) -> list[str]:
        if "|" in task:
            return [part.strip() for part in task.split("|") if part.strip()][:opts.workers]
        messages = [{"role": r, "content": c.format(n=opts.workers)} for r, c in SPLIT]
        messages.append({"role": "user", "content": f"Task: {task}"})
        reply = self.llm.chat(messages, model=model, max_tokens=opts.max_tokens)
        items = ITEM.findall(reply.message.content or "")[:opts.workers]
        return items or [task]  # a plan that did not parse: one worker does it all

    def start(self, index: int, subtask: str, model: str, deadline: float,
              opts: argparse.Namespace) -> dict[str, Any]:
        """Spawn one worker and mail it its job; a refusal is recorded as its result."""
        name = f"{self.name[:40]}-{self.id}-{index + 1}"
        worker: dict[str, Any] = {"worker": name, "subtask": subtask}
        try:
            worker["id"] = self.proc.spawn(WORKER, name=name, argv=[f"agent:{self.id}"])
            grant = self.caps.delegate(
                f"agent:{worker['id']}", [f"llm.chat@llm/{model}", f"ipc.send@ipc/{self.name}"],
                ttl=max(1.0, deadline - time.time()), budgets={"llm_tokens": opts.max_tokens})
            self.ipc.send(name, {"index": index, "subtask": subtask, "model": model,
                                 "token": grant.token, "max_tokens": opts.max_tokens,
                                 "deadline": deadline, "reply_to": self.name})
        except SyscallError as exc:
            worker.update(error=exc.code.name, message=exc.message)
        print(f"{name}: {subtask}", flush=True)
        return worker

    def gather(self, crew: list[dict[str, Any]], deadline: float) -> None:
        """Each running worker's answer or typed error, by the deadline."""
        pending = {w["id"]: w for w in crew if "error" not in w}
        ended: dict[int, Any] = {}
        while pending and (left := deadline - time.monotonic()) > 0:
            try:
                message = self.ipc.recv(timeout=min(left, POLL))
            except (TimedOut, TryAgain):  # TryAgain: asked with under a millisecond left
                message = None
            if message is not None:
                worker = pending.pop(message.sender_id, None)
                if worker is not None:  # mail from anyone else is not an answer
                    worker.update(_reply(message.data))
                continue
            # The mailbox is empty, so a worker already seen ended has no answer coming: it
            # would have been mailed before the worker ended.
            for wid, info in ended.items():
                if wid in pending:
                    pending.pop(wid).update(
                        error="ECANCELED", message=f"worker ended ({info.state}, exit status "
                        f"{info.exit_status}) without answering")
            ended = {wid: info for wid in pending
                     if (info := self.proc.info(wid)).state not in LIVE}
        for worker in pending.values():
            worker.update(error="ETIMEDOUT", message="no answer by the deadline")

    def combine(self, task: str, answers: list[dict[str, Any]], model: str,
                opts: argparse.Namespace) -> str:
        parts = "\n".join(f"{i + 1}. {w['subtask']}: {w['answer']}"
                          for i, w in enumerate(answers))
        reply = self.llm.chat([{"role": "user", "content": f"Task: {task}\n\nAnswers to its "
                                f"parts:\n{parts}\n\nCombine them into one short answer."}],
                              model=model, max_tokens=opts.max_tokens)
        return reply.message.content or ""


def _reply(data: Any) -> dict[str, Any]:
    """A worker's answer or its own typed error (an ErrorCode's name); anything else is a
    malformed reply."""
    if isinstance(data, dict) and isinstance(data.get("answer"), str):
        return {"answer": data["answer"]}
    if isinstance(data, dict) and data.get("error") in ErrorCode.__members__:
        return {"error": data["error"], "message": str(data.get("message", ""))}
    return {"error": "EINVAL", "message": "malformed reply"}
