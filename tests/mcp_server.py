"""A small MCP server (stdio) for the tests: arithmetic, an echo of its sandbox, a slow tool."""

import os
import time

from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations

server = MCPServer("agentos-test")


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def whoami() -> dict:
    """What the server process sees of its sandbox."""
    try:
        with open("/etc/hostname"):
            pass
        etc = "readable"
    except OSError:
        etc = "blocked"
    return {"pid": os.getpid(), "home": os.environ.get("HOME", ""), "etc_hostname": etc}


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def nap(seconds: float) -> str:
    """Sleep."""
    time.sleep(seconds)
    return "rested"


@server.tool()
def forget() -> str:
    """Unannotated: MCP's default says destructive."""
    return "forgotten"


if __name__ == "__main__":
    server.run("stdio")
