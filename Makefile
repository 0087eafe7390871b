# The two commands of the README. Both set everything up first (tools/bootstrap is idempotent).
.PHONY: demo test lint bootstrap

bootstrap:
	@tools/bootstrap

demo: bootstrap
	@tools/demo

lint: bootstrap
	.venv/bin/ruff check .
	.venv/bin/python tools/testlint.py

test: bootstrap lint
	.venv/bin/python -m pytest -q --durations=25
