"""The demo agent: greets the kernel through each syscall family, then asks the model.

    agentos run --cap llm.chat userland/agents/hello.py -- "your question"
"""

from __future__ import annotations

import time

from sdk import Agent, PermissionDenied, SyscallError


class Hello(Agent):
    def run(self, task: str) -> dict:
        me = self.proc.info(self.id)
        stats = self.sys.stats()
        # No capability names another agent's mailbox, so this must be refused.
        try:
            self.ipc.send("nobody", "hi")
            send = "allowed?!"
        except PermissionDenied as exc:
            send = f"refused as it should be ({exc.code.name})"
        print(f"hello from agent {me.id} ({me.name}), pid {me.pid}", flush=True)
        question = task or "In one sentence, what does an operating system do?"
        try:
            stream = self.llm.stream([{"role": "user", "content": question}], max_tokens=64)
            print("model says: ", end="", flush=True)
            for delta in stream:
                print(delta.text, end="", flush=True)
            print()
            reply = stream.result
            answer = {"text": reply.message.content, "tokens": reply.usage.completion_tokens,
                      "ttft_ms": reply.ttft_ms, "total_ms": reply.total_ms}
        except SyscallError as exc:
            answer = {"error": str(exc)}
        # Timed after the model call and a pause: a kernel that preloads its model is busy
        # loading it at first (its loop shares the interpreter lock with the loading thread),
        # and right after a generation torch's OpenMP threads still spin on both cores.
        time.sleep(1.0)
        samples = []
        for _ in range(200):
            start = time.perf_counter()
            self.sys.null()
            samples.append(time.perf_counter() - start)
        null_us = sorted(samples)[len(samples) // 2] * 1e6
        return {
            "task": task or "(none)",
            "agent": me.id,
            "kernel": f"agentos {stats.version}, ABI {stats.abi}",
            "null_syscall_p50_us": round(null_us, 1),
            "ipc_send_without_capability": send,
            "question": question,
            "answer": answer,
        }
