"""Asks for each model its task lists (JSON; null: none named, so the SDK's default) and
returns what answered, or the error code; and the model variables it was started with."""

import json
import os

from sdk import Agent, SyscallError


class ModelAgent(Agent):
    def run(self, task: str) -> dict:
        answers = []
        for model in json.loads(task):
            try:
                result = self.llm.chat([{"role": "user", "content": "hi"}], model=model,
                                       max_tokens=2)
                answers.append(result.model)
            except SyscallError as exc:
                answers.append(f"{exc.code.name}: {exc.message}")
        env = {name: os.environ.get(name)
               for name in ("AGENTOS_MODEL", "OPENAI_MODEL", "OPENAI_DEFAULT_MODEL")}
        return {"answers": answers, "env": env}
