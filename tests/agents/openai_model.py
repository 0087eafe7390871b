"""An unmodified OpenAI-client script that takes its model from OPENAI_MODEL, as example
scripts do. Prints one JSON line: the model it asked for, the one that answered, the listing."""

import json
import os

import openai

client = openai.OpenAI(max_retries=0, timeout=60)
asked = os.environ.get("OPENAI_MODEL", "gpt-4o-mini")
reply = client.chat.completions.create(model=asked, max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])
print(json.dumps({"asked": asked, "answered": reply.model,
                  "listed": sorted(m.id for m in client.models.list())}))
