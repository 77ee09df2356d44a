# make env   create or reuse the pinned Python 3.10 environment at ./.venv (scripts/setup_env.sh)
# make test  the test suite (what CI runs)
PY := .venv/bin/python

.PHONY: env test
env:
	@bash scripts/setup_env.sh

test: env
	$(PY) -m pytest -q tests
