"""An asyncio agent: many concurrent syscalls on one connection."""

import asyncio

from sdk import Agent


class Aio(Agent):
    async def run(self, task: str) -> dict:
        results = await asyncio.gather(*(self.sys.null() for _ in range(50)))
        stats = await self.sys.stats()
        me = await self.proc.info(self.id)
        return {"nulls": len(results), "abi": stats.abi, "me": me.name}
