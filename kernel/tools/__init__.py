"""The tool manager: sandboxed tool processes, MCP servers as tools, limits and locks."""
