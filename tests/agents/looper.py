"""Runs the tool-calling loop on its task with the calculator and time tools."""

import msgspec

from sdk import Agent


class Looper(Agent):
    def run(self, task: str) -> dict:
        steps, _, question = task.partition(" ")
        result = self.run_tools([{"role": "user", "content": question}], ["calculator", "time"],
                                max_steps=int(steps), max_tokens=48)
        return {"answer": result.answer, "steps": result.steps, "calls": result.tool_calls,
                "errors": result.errors, "messages": msgspec.to_builtins(result.messages)}
