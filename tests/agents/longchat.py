"""Streams long generations from the default model, one after another, printing when the first
delta arrives; runs until killed. (One 4,000-token generation of the tiny test model can end
before a test has looked at it.)"""

import sdk

with sdk.connect() as conn:
    first = True
    while True:
        for _ in conn.llm.stream([{"role": "user", "content": "go on"}], max_tokens=4000):
            if first:
                print("streaming", flush=True)
                first = False
