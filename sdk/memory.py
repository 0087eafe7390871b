"""The `memory` syscall family: an agent's own memories and the shared namespaces its
capabilities grant, searched by meaning (embeddings) or by keywords; and `Conversation`, chat
history kept there so a restarted agent resumes where it was."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdk import abi
from sdk.syscalls import Family


class Memory(Family):
    def add(self, content: str, metadata: Mapping[str, Any] | None = None, *,
            namespace: str | None = None) -> int:
        """Store a memory; returns its id once it is durable (and embedded). `namespace`
        defaults to the agent's own (`agent/<name>`); others need `memory.add@mem/<ns>`."""
        args = abi.MemoryAddArgs(content=content, metadata=dict(metadata or {}),
                                 namespace=namespace)
        return self._call("memory.add", args)

    def get(self, memory_id: int, *, namespace: str | None = None) -> abi.Memory:
        return self._call("memory.get", abi.MemoryRef(id=memory_id, namespace=namespace))

    def update(self, memory_id: int, content: str | None = None,
               metadata: Mapping[str, Any] | None = None, *,
               namespace: str | None = None) -> None:
        args = abi.MemoryUpdateArgs(id=memory_id, content=content, namespace=namespace,
                                    metadata=None if metadata is None else dict(metadata))
        return self._call("memory.update", args)

    def delete(self, memory_id: int, *, namespace: str | None = None) -> None:
        """Delete a memory for good (an irreversible operation)."""
        return self._call("memory.delete", abi.MemoryRef(id=memory_id, namespace=namespace))

    def list(self, *, namespace: str | None = None, after: int = 0, limit: int = 100,
             filter: Mapping[str, Any] | None = None) -> list[abi.Memory]:
        """Memories with ids above `after`, oldest first (page with the last id)."""
        args = abi.MemoryListArgs(namespace=namespace, after=after, limit=limit,
                                  filter=dict(filter or {}))
        return self._call("memory.list", args)

    def search(self, query: str, k: int = 5, *, filter: Mapping[str, Any] | None = None,
               namespace: str | None = None, mode: str = "auto") -> list[abi.MemoryHit]:
        """The `k` memories closest in meaning to `query` (`mode="keyword"`: by shared words;
        the kernel falls back to keywords when it has no embedding model). `filter` keeps
        memories whose metadata has each key equal to its value."""
        args = abi.MemorySearchArgs(query=query, k=k, filter=dict(filter or {}),
                                    namespace=namespace, mode=mode)
        return self._call("memory.search", args)

    def embed(self, texts: list[str]) -> abi.EmbedResult:
        """The memory manager's embeddings of `texts` (unit vectors, 384 wide with MiniLM)."""
        return self._call("memory.embed", abi.EmbedArgs(input=list(texts)))


class Conversation:
    """A chat whose messages live in the memory manager (blocking connections): constructing
    one with the same name reloads its history, so an agent that restarts resumes it."""

    def __init__(self, memory: Memory, name: str = "default", *,
                 namespace: str | None = None) -> None:
        self.memory, self.name, self.namespace = memory, name, namespace
        self.messages: list[dict[str, str]] = []
        after = 0
        while True:
            page = memory.list(namespace=namespace, after=after, limit=1000,
                               filter={"kind": "chat", "conversation": name})
            for m in page:
                role = m.metadata["role"]
                self.messages.append({"role": role, "content": m.content[len(role) + 2:]})
            if len(page) < 1000:
                break
            after = page[-1].id

    def append(self, role: str, content: str) -> None:
        """Record one message (durable when this returns)."""
        self.memory.add(f"{role}: {content}", {"kind": "chat", "conversation": self.name,
                                               "role": role}, namespace=self.namespace)
        self.messages.append({"role": role, "content": content})

    def chat(self, llm: Any, text: str, **options: Any) -> abi.ChatResult:
        """Send `text` as the user's next turn with the whole history; record both turns."""
        self.append("user", text)
        result = llm.chat(self.messages, **options)
        self.append("assistant", result.message.content or "")
        return result
