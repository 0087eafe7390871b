"""The LLM core: model store, continuously batched engine, schedulers, context switch."""
