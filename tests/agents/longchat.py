"""Streams one long generation from the default model, printing when the first delta arrives;
runs until killed."""

import sdk

with sdk.connect() as conn:
    for i, _ in enumerate(conn.llm.stream([{"role": "user", "content": "go on"}],
                                          max_tokens=4000)):
        if i == 0:
            print("streaming", flush=True)
