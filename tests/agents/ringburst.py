"""Submits sys.null calls in bursts of 200 through its ring until it is killed."""

import asyncio

import sdk


async def main() -> None:
    async with sdk.connect_async() as conn:
        assert conn.uses_rings
        while True:
            await asyncio.gather(*(conn.sys.null() for _ in range(200)))


asyncio.run(main())
