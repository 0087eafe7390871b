"""Not a tool the kernel will load: its manifest is not a literal."""

MANIFEST = dict(name="broken")
