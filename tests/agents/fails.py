"""An agent whose run() raises: the runner must exit 1 with the traceback on stderr."""

from sdk import Agent


class Fails(Agent):
    def run(self, task: str) -> None:
        raise RuntimeError("this agent fails on purpose")
