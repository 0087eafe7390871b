"""Runs the tool-calling loop with the calculator and time tools; task `STEPS MAX_TOKENS Q...`."""

import msgspec

from sdk import Agent


class Looper(Agent):
    def run(self, task: str) -> dict:
        steps, max_tokens, question = task.split(" ", 2)
        result = self.run_tools([{"role": "user", "content": question}], ["calculator", "time"],
                                max_steps=int(steps), max_tokens=int(max_tokens))
        return {"answer": result.answer, "steps": result.steps, "calls": result.tool_calls,
                "errors": result.errors, "messages": msgspec.to_builtins(result.messages)}
