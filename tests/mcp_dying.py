"""An MCP server (stdio) that dies on request, for the dependency-failure tests."""

import os
import sys
import time

from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations

server = MCPServer("agentos-dying")
READ_ONLY = ToolAnnotations(read_only_hint=True)


@server.tool(annotations=READ_ONLY)
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool(annotations=READ_ONLY)
def die() -> str:
    """Exit the server mid-call, as a crash would."""
    sys.stdout.flush()
    os._exit(3)


@server.tool(annotations=READ_ONLY)
def pid() -> int:
    """The server's pid."""
    return os.getpid()


@server.tool(annotations=READ_ONLY)
def wedge(seconds: float) -> str:
    """Hang without answering."""
    time.sleep(seconds)
    return "awake"


if __name__ == "__main__":
    server.run("stdio")
