#!/usr/bin/env bash
# make test (what CI runs): the test suite on both supported stacks at once, then the GPU check's CPU
# rehearsal, started as soon as the first suite is done. A 2-core machine runs two of these jobs side by
# side, so each runs torch on one thread (OMP_NUM_THREADS=1). Each job writes a log under TEST_LOGS (default:
# a new folder under ${TMPDIR:-/tmp}), printed when the job ends; the exit status is 1 if any job failed.
#
#   bash scripts/test_all.sh [PYTEST_ARGS...]      (arguments go to both suites' pytest)
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
logs="${TEST_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/d2_smallbn_test.XXXXXX")}"
mkdir -p "$logs"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# environments and the GPU bundle first, one at a time (they install; the bundle needs the registry)
pinned="$(bash scripts/setup_env.sh pinned)" && current="$(bash scripts/setup_env.sh current)" \
  && bash scripts/gpu_bundle.sh || exit 1

declare -A pids started titles
start() {  # start NAME TITLE COMMAND...: runs the job in the background, its output in $logs/NAME.log
  local name="$1" title="$2"; shift 2
  "$@" > "$logs/$name.log" 2>&1 &
  pids[$name]=$! started[$name]=$(date +%s) titles[$name]="$title"
  echo "== $title: started (log: $logs/$name.log)"
}
failed=()
finish() {  # finish NAME: waits for the job, then prints its log and how it ended
  local name="$1" rc=0
  wait "${pids[$name]}" || rc=$?
  echo "== ${titles[$name]}: $([ "$rc" = 0 ] && echo passed || echo "FAILED (exit $rc)") in $(( $(date +%s) - started[$name] )) s"
  cat "$logs/$name.log"
  [ "$rc" = 0 ] || failed+=("${titles[$name]}")
  unset "pids[$name]"
}

start pinned "test suite, pinned stack" "$pinned" -m pytest -q tests "$@"
start current "test suite, current stack" "$current" -m pytest -q tests "$@"
wait -n || true  # the first suite to end
for name in "${!pids[@]}"; do
  kill -0 "${pids[$name]}" 2>/dev/null || finish "$name"
done
start gpu_check "GPU check, CPU rehearsal" env GPU_CHECK_DEVICE=cpu bash tools/gpu_check.sh
for name in pinned current gpu_check; do
  [ -n "${pids[$name]:-}" ] && finish "$name"
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "== make test: FAILED: $(IFS=';'; echo "${failed[*]}") (logs in $logs)"; exit 1
fi
echo "== make test: all passed (logs in $logs)"
