"""ReAct: think, act with one tool, read what it returned, repeat until done or out of steps.

    agentos run --cap llm.chat --cap tools.call@tool/calculator userland/agents/react.py \
        -- "What is 17 * 23?"

Options before the task: `--model NAME` (default: the kernel's default model), `--steps N`
(model calls before it gives up, default 6). Its tools: the kernel's `calculator`, its own
files (`list_files`, `read_file`: the agent's `fs` namespace) and its memory
(`search_memory`); each finished task is remembered, so later runs can search for it.

The protocol is text, not the kernel's JSON tool calls: a 135M model (SmolLM2) follows a
few-shot `Action: tool[input]` pattern but not a function-calling schema. Whatever the model
writes, the loop goes on: an unknown tool or a reply with no action becomes an Observation
that says what went wrong, and the step limit ends it.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import Any

from sdk import Agent, SyscallError

SYSTEM = """You solve tasks step by step with tools. Each reply is one Thought and one Action.
Tools:
  calculator[expression]  arithmetic, e.g. calculator[2 * (3 + 4)]
  list_files[directory]   your files ('' for all)
  read_file[path]         one of your files
  search_memory[query]    what you remembered from earlier tasks
  finish[answer]          give the final answer"""

# Worked examples as earlier turns of the chat: small models copy the format of what they saw.
EXAMPLES = [
    ("user", "Task: What is 12 times 7?"),
    ("assistant", "Thought: I will use the calculator.\nAction: calculator[12 * 7]"),
    ("user", "Observation: 84"),
    ("assistant", "Thought: The calculator says 84.\nAction: finish[84]"),
    ("user", "Task: What is 250 + 38?"),
    ("assistant", "Thought: I will use the calculator.\nAction: calculator[250 + 38]"),
    ("user", "Observation: 288"),
    ("assistant", "Thought: The calculator says 288.\nAction: finish[288]"),
    ("user", "Task: What does my file todo.txt say?"),
    ("assistant", "Thought: I will read the file.\nAction: read_file[todo.txt]"),
    ("user", "Observation: buy milk"),
    ("assistant", "Thought: The file says buy milk.\nAction: finish[buy milk]"),
]

# `Action: tool[input]`; also `tool(input)` and `tool: input`, which small models write too.
ACTION = re.compile(r"Action\s*:\s*([A-Za-z_]+)\s*(?:\[(.*)\]|\((.*)\)|:\s*(.*))?\s*$",
                    re.MULTILINE)
FINAL = re.compile(r"Final Answer\s*:\s*(.+)", re.DOTALL)
OBSERVATION_CHARS = 1000  # a long file or result is cut: the prompt must stay small


def options(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="react.py")
    parser.add_argument("--model", help="model to use (default: the kernel's default)")
    parser.add_argument("--steps", type=int, default=6, help="model calls before giving up")
    parser.add_argument("--max-tokens", type=int, default=64, help="per model call")
    parser.add_argument("task", nargs="+")
    return parser.parse_args(argv)


def parse(reply: str) -> tuple[str, str] | None:
    """The (tool, input) a reply asks for, or None if it names no action."""
    match = ACTION.search(reply)
    if match:
        tool, *inputs = match.groups()
        text = next((i for i in inputs if i is not None), "")
        return tool.lower(), text.strip().strip("'\"")
    final = FINAL.search(reply)
    return ("finish", final.group(1).strip()) if final else None


class ReAct(Agent):
    def run(self, task: str) -> dict[str, Any]:
        opts = options(sys.argv[1:])
        return self.solve(" ".join(opts.task), opts)

    def solve(self, task: str, opts: argparse.Namespace) -> dict[str, Any]:
        """The loop itself, for `opts` as `options` parses them (tools/bench/agents.py runs it
        in-process too, its model calls made directly: the benchmark's baseline)."""
        tools = {"calculator": self.calculator, "list_files": self.list_files,
                 "read_file": self.read_file, "search_memory": self.search_memory}
        messages = [{"role": "system", "content": SYSTEM},
                    *({"role": r, "content": c} for r, c in EXAMPLES),
                    {"role": "user", "content": f"Task: {task}"}]
        trace: list[dict[str, Any]] = []
        answer = None
        for _ in range(opts.steps):
            # Stop before the model writes an Observation itself: those come from the tools.
            reply = self.llm.chat(messages, model=opts.model, max_tokens=opts.max_tokens,
                                  stop=["Observation:"]).message.content or ""
            messages.append({"role": "assistant", "content": reply})
            action = parse(reply)
            if action is None:
                observation = ("error: no Action in your reply. Write 'Thought: ...' and then "
                               "'Action: tool[input]'.")
            elif action[0] == "finish":
                answer = action[1]
                trace.append({"reply": reply, "action": action})
                break
            elif action[0] not in tools:
                near = difflib.get_close_matches(action[0], [*tools, "finish"], n=1, cutoff=0)
                observation = (f"error: there is no tool {action[0]!r}; did you mean {near[0]}? "
                               f"The tools: {', '.join([*tools, 'finish'])}.")
            else:
                observation = tools[action[0]](action[1])
            observation = observation[:OBSERVATION_CHARS]
            # Small models repeat themselves: say so, and point at the way out.
            if trace and action is not None and trace[-1]["action"] == action:
                observation += " (you did this already; if that answers the task, finish)"
            print(f"{reply}\nObservation: {observation}", flush=True)
            trace.append({"reply": reply, "action": action, "observation": observation})
            messages.append({"role": "user", "content": f"Observation: {observation}"})
        if answer is not None:
            # Remembered in its own memory: the next task can find it with search_memory.
            self.memory.add(f"Task: {task}\nAnswer: {answer}", {"kind": "react"})
        return {"task": task, "answer": answer, "steps": len(trace), "trace": trace}

    # --- the tools: each takes the action's input and returns the observation's text ---------

    def calculator(self, expression: str) -> str:
        try:
            result = self.tools.call("calculator", expression=expression)
        except SyscallError as exc:  # e.g. an empty expression fails the tool's schema
            return f"error: {exc.message}"
        return f"error: {result.error}" if result.error else str(result.value["value"])

    def list_files(self, directory: str) -> str:
        try:
            entries = self.fs.list(directory.strip("/"))
        except SyscallError as exc:
            return f"error: {exc.message}"
        return ", ".join(e.path + ("/" if e.kind == "dir" else "") for e in entries) or "(none)"

    def read_file(self, path: str) -> str:
        try:
            return self.fs.read(path).decode(errors="replace")
        except SyscallError as exc:
            return f"error: {exc.message}"

    def search_memory(self, query: str) -> str:
        if not query:
            return "error: search_memory needs a query"
        hits = self.memory.search(query, k=3)
        return "\n".join(h.content for h in hits) or "(nothing remembered about that)"
