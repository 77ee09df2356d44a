# make quickstart   set up if needed, generate the built-in dataset, train + COCO-evaluate the CBN
#                   quickstart model; options: make quickstart ARGS="--norm mabn --iters 1000"
# make test         the test suite on both supported stacks, then the GPU check's CPU rehearsal (what CI runs);
#                   make test STACK=pinned (or current) runs the suite on one stack only
# make env          create or reuse a stack's environment: STACK=pinned (default, ./.venv) or current (./.venv-current)
# make gpu-bundle   write .gpu/, the wheels the offline GPU machine lacks (docs/gpu.md)
# make gpu-check-cpu  rehearse tools/gpu_check.sh on CPU, in the GPU machine's stand-in environment
STACK ?=
ENV = bash scripts/setup_env.sh

.PHONY: env test quickstart gpu-bundle gpu-check-cpu
env:
	@$(ENV) $(or $(STACK),pinned) >/dev/null

test:
ifeq ($(STACK),)
	@for stack in pinned current; do \
	  echo "== test suite, $$stack stack"; \
	  python="$$($(ENV) $$stack)" && "$$python" -m pytest -q tests || exit 1; \
	done
	@$(MAKE) --no-print-directory gpu-check-cpu
else
	@python="$$($(ENV) $(STACK))" && "$$python" -m pytest -q tests
endif

quickstart:
	@python="$$($(ENV) $(or $(STACK),pinned))" && "$$python" tools/quickstart.py $(ARGS)

gpu-bundle:
	@bash scripts/gpu_bundle.sh

gpu-check-cpu: gpu-bundle
	@GPU_CHECK_DEVICE=cpu bash tools/gpu_check.sh
