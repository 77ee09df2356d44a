# make quickstart   set up if needed, generate the built-in dataset, train + COCO-evaluate the CBN
#                   quickstart model; options: make quickstart ARGS="--norm mabn --iters 1000"
# make test         what CI runs (scripts/test_all.sh): the test suite on both supported stacks at once (one torch
#                   thread each), then the GPU check's CPU rehearsal, started when the first suite is done; every
#                   job's log is printed as it ends. make test STACK=pinned (or current) runs one stack's suite only
# make test-fast    the quick subset for iteration (under 3 minutes): the pinned stack's suite without the tests
#                   marked slow (pytest -m "not slow": the ones that start processes, train or run studies), torch
#                   on one thread (tiny models gain nothing from more, and a busy machine's spinning threads cost).
#                   CI still runs make test; make test-fast STACK=current runs the subset on the other stack
# make env          create or reuse a stack's environment: STACK=pinned (default, ./.venv) or current (./.venv-current)
# make gpu-bundle   write .gpu/, the wheels the offline GPU machine lacks (docs/gpu.md)
# make gpu-check-cpu  rehearse tools/gpu_check.sh on CPU, in the GPU machine's stand-in environment
STACK ?=
ENV = bash scripts/setup_env.sh

.PHONY: env test test-fast quickstart gpu-bundle gpu-check-cpu
env:
	@$(ENV) $(or $(STACK),pinned) >/dev/null

test:
ifeq ($(STACK),)
	@bash scripts/test_all.sh
else
	@python="$$($(ENV) $(STACK))" && "$$python" -m pytest -q tests
endif

test-fast:
	@python="$$($(ENV) $(or $(STACK),pinned))" && OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} "$$python" -m pytest -q -m "not slow" tests

quickstart:
	@python="$$($(ENV) $(or $(STACK),pinned))" && "$$python" tools/quickstart.py $(ARGS)

gpu-bundle:
	@bash scripts/gpu_bundle.sh

gpu-check-cpu: gpu-bundle
	@GPU_CHECK_DEVICE=cpu bash tools/gpu_check.sh
