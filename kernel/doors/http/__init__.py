"""The kernel's HTTP front doors: OpenAI- and AIOS-compatible APIs and Prometheus metrics."""
