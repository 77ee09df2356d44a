# make quickstart  set up if needed, generate the built-in dataset, train + COCO-evaluate the CBN
#                  quickstart model; options: make quickstart ARGS="--norm mabn --iters 1000"
# make test        the test suite (what CI runs)
# make env         create or reuse the pinned Python 3.10 environment at ./.venv
PY := .venv/bin/python

.PHONY: env test quickstart
env:
	@bash scripts/setup_env.sh

test: env
	$(PY) -m pytest -q tests

quickstart: env
	$(PY) tools/quickstart.py $(ARGS)
