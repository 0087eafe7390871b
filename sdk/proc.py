"""The `proc` syscall family: spawn, inspect, wait for and kill agent processes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sdk import abi
from sdk.syscalls import Family


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else max(0, int(seconds * 1000))


class Proc(Family):
    def spawn(self, path: str, *, name: str | None = None, argv: Sequence[str] = (),
              caps: Sequence[str] = (), sandbox: str | None = None, restart: str = "no",
              limits: Mapping[str, int] | None = None, group: str | None = None,
              model: str | None = None, venv: str | None = None) -> int:
        """Start the agent program at `path`; `caps` are rules `OP[@RESOURCE]` for its token.
        `sandbox` is none | standard | strict (None: the kernel's default), `restart` is
        no | on-failure | always, `limits` overrides rlimits (e.g. {"address_space": 1 << 30})
        and the captured log size ("log_bytes"), `group` is a privilege group whose template
        it also gets, `model` its default model (AGENTOS_MODEL, OPENAI_MODEL in its
        environment), `venv` a virtual environment (built outside the sandbox, as `agentos run
        --requirements` does) whose interpreter runs it, read-only."""
        args = abi.SpawnArgs(path=path, name=name, argv=list(argv), caps=list(caps),
                             sandbox=sandbox, restart=restart, limits=dict(limits or {}),
                             group=group, model=model, venv=venv)
        return self._call("proc.spawn", args)

    def suspend(self, agent_id: int) -> None:
        """Stop every process of the agent (SIGSTOP) and hold its queued LLM requests."""
        return self._call("proc.suspend", abi.AgentRef(id=agent_id))

    def resume(self, agent_id: int) -> None:
        return self._call("proc.resume", abi.AgentRef(id=agent_id))

    def ps(self) -> list[abi.AgentInfo]:
        return self._call("proc.ps")

    def info(self, agent_id: int) -> abi.AgentInfo:
        return self._call("proc.info", abi.AgentRef(id=agent_id))

    def wait(self, agent_id: int, timeout: float | None = None) -> abi.AgentInfo:
        """Block until the agent ends (ETIMEDOUT after `timeout` seconds, if given)."""
        ms = _ms(timeout)
        return self._call("proc.wait", abi.WaitArgs(id=agent_id, timeout_ms=ms),
                          server_wait_ms=ms, wait_forever=ms is None)

    def kill(self, agent_id: int, grace: float = 5.0) -> None:
        """SIGTERM now, SIGKILL if it is still alive after `grace` seconds."""
        return self._call("proc.kill", abi.KillArgs(id=agent_id, grace_ms=_ms(grace) or 0))

    def exit(self, result: Any = None) -> None:
        """Record this agent's result and declare it done: the process must exit within the
        kernel's grace period (or is killed), and the kernel refuses its later syscalls."""
        return self._call("proc.exit", abi.ExitArgs(result=result))

    def logs(self, agent_id: int, stream: str = "stdout", offset: int = 0,
             limit: int = 65536) -> abi.LogChunk:
        args = abi.LogsArgs(id=agent_id, stream=stream, offset=offset, limit=limit)
        return self._call("proc.logs", args)
