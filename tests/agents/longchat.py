"""Streams long generations from the default model, one after another, printing when the first
delta arrives; runs until killed. A regex holds each one open for hundreds of tokens (the tiny
test model says EOS early, and a generation shorter than the kernel's 0.5 s publishing interval
never shows in `sys.stats`)."""

import sdk

with sdk.connect() as conn:
    first = True
    while True:
        for _ in conn.llm.stream([{"role": "user", "content": "go on"}], max_tokens=4000,
                                regex="(go on ){300,}"):
            if first:
                print("streaming", flush=True)
                first = False
