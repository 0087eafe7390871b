"""An unmodified OpenAI-client program, as found in the wild: it knows nothing of agentos.

    agentos run --cap llm.chat --model smollm2 userland/agents/openai_chat/agent.py -- "hi"

`agentos run` builds its environment from the requirements.txt beside it (once), and the
kernel starts it sandboxed with OPENAI_BASE_URL (its own door, inside its sandbox),
OPENAI_API_KEY (its own token, no wider) and OPENAI_MODEL set: each call is this agent's, under
its capabilities and budgets. It streams its answer to stdout (`agentos logs ID`).
"""

import os
import sys

from openai import OpenAI

client = OpenAI()
question = " ".join(sys.argv[1:]) or "In one sentence, what is an operating system?"
stream = client.chat.completions.create(
    model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"), max_tokens=64, stream=True,
    messages=[{"role": "user", "content": question}])
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
