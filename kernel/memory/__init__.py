"""The memory manager: per-agent and shared memories, embeddings, vector index, RAM tier."""
