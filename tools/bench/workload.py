"""The benchmark's agent workload: a shared system prompt and per-agent growing histories."""

SYSTEM = (
    "You are a careful research assistant working inside an agent operating system. You answer "
    "briefly and precisely. You have access to memory, storage and tools through the kernel, "
    "but in this conversation you only need to reason and reply in plain text. Keep every "
    "answer to one or two sentences. If a question is ambiguous, state your assumption first. "
    "Never invent citations. Prefer numbers over adjectives and examples over definitions."
)

TOPICS = ["prime numbers", "the water cycle", "binary search", "photosynthesis", "TCP handshakes",
          "compound interest", "plate tectonics", "hash tables", "vaccines", "the moon's phases",
          "sorting algorithms", "rainbows", "inflation", "DNA replication", "volcanoes", "caches"]


def user_turn(index: int, turn: int) -> str:
    topic = TOPICS[(index + turn) % len(TOPICS)]
    if turn == 0:
        return f"Agent {index} here. Explain {topic} to a twelve-year-old."
    return f"Now give one surprising fact about {topic}."
