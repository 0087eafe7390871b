"""Reports the caveats of the token it was spawned with."""

from sdk import Agent


class Grouped(Agent):
    def run(self, task: str) -> list:
        return self.caps.inspect().caveats
