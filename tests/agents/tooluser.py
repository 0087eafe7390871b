"""Makes the tool calls its task names (JSON: [[name, arguments], ...]); returns each outcome."""

import json

import sdk
from sdk import Agent


class ToolUser(Agent):
    def run(self, task: str) -> list:
        out = []
        for name, arguments in json.loads(task):
            try:
                result = self.tools.call(name, arguments)
                out.append({"value": result.value, "error": result.error})
            except sdk.SyscallError as exc:
                out.append({"code": exc.code.name, "message": exc.message})
        return out
