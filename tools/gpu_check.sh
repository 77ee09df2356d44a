#!/usr/bin/env bash
# The GPU check: one offline command for a lent GPU machine (docs/gpu.md says how to run and read it).
#
#   bash tools/gpu_check.sh                        on the GPU machine, with .gpu/ (make gpu-bundle) beside the checkout
#   GPU_CHECK_DEVICE=cpu bash tools/gpu_check.sh   the same flow on CPU at tiny sizes, in the GPU machine's
#                                                  stand-in environment (scripts/setup_env.sh gpu-standin)
#
# It installs .gpu/ with pip --no-index into a venv over the machine's preinstalled torch, then runs
# d2_smallbn.gpu_check: the CUDA tests, the layer and model benchmarks at the papers' size, and 200
# AMP iterations of each quickstart norm, within GPU_CHECK_BUDGET_S seconds (default 480). The report
# (gpu_check.json, gpu_check.md, gpu_check_logs.tar.gz) goes to $OUT when set, else output/gpu_check/.
#
# Variables: GPU_CHECK_DEVICE (cuda|cpu), GPU_CHECK_PYTHON (the Python with torch; default python3 on
# CUDA, the stand-in on CPU), GPU_CHECK_BUDGET_S, GPU_CHECK_WORK (scratch folder), GPU_CHECK_BUNDLE
# (default .gpu), OUT.
set -euo pipefail
start=$(date +%s)
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
device="${GPU_CHECK_DEVICE:-cuda}"
bundle="${GPU_CHECK_BUNDLE:-$root/.gpu}"
out="${OUT:-$root/output/gpu_check}"
work="${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/d2_smallbn_gpu_check_$device}"

fail() { echo "gpu_check: $*" >&2; exit 2; }

case "$device" in
  cuda) python="${GPU_CHECK_PYTHON:-python3}" ;;
  cpu) python="${GPU_CHECK_PYTHON:-$(bash "$root/scripts/setup_env.sh" gpu-standin)}" ;;
  *) fail "GPU_CHECK_DEVICE='$device' is not a device this check knows; use cuda (the default) or cpu" ;;
esac
command -v "$python" >/dev/null 2>&1 || [ -x "$python" ] || fail "no Python '$python'; set GPU_CHECK_PYTHON to the Python that has torch"
if [ "$device" = cuda ]; then
  "$python" - <<'EOF' || fail "no CUDA device visible to $python (see above). On a machine without a GPU, rehearse the check with GPU_CHECK_DEVICE=cpu bash tools/gpu_check.sh"
import sys
try:
    import torch
except ImportError:
    sys.exit("torch is not installed in this Python; set GPU_CHECK_PYTHON to the one that has it")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA device")
EOF
fi

# The bundle: every wheel named in .gpu/BUNDLE must be there, and every requirement must have a wheel.
[ -f "$bundle/BUNDLE" ] || fail "$bundle/BUNDLE is missing: build the bundle with 'make gpu-bundle' (needs the package registry) and carry .gpu/ with the checkout (run tool: carry [\".gpu\"])"
rebuild="rebuild it with 'make gpu-bundle' and carry .gpu/ along"
while read -r wheel; do
  [ -f "$bundle/$wheel" ] || fail "the bundle lacks $wheel (listed in .gpu/BUNDLE): $rebuild"
done < <(tail -n +2 "$bundle/BUNDLE")
while read -r requirement; do
  name="$(echo "${requirement%%==*}" | tr 'A-Z-' 'a-z_')"
  ls "$bundle" | tr 'A-Z' 'a-z' | grep -q "^${name}-" || fail "the bundle has no wheel for $requirement (requirements/current.txt): $rebuild"
done < <(grep -v '^\s*#' "$root/requirements/current.txt" | grep -v '^\s*$')
for name in sal_detectron2 pip; do
  ls "$bundle"/${name}-*.whl >/dev/null 2>&1 || fail "the bundle has no $name wheel: $rebuild"
done

# A venv over the given Python's packages. That Python may itself be a venv (the GPU machine's is),
# whose packages --system-site-packages would not reach, so its site folders go into a .pth file.
rm -rf "$work" && mkdir -p "$work" "$out"
"$python" -m venv --without-pip --system-site-packages "$work/venv"
site="$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$python" -c 'import site; print("\n".join(site.getsitepackages()))' > "$site/gpu_check_base.pth"
pip_wheel="$(ls "$bundle"/pip-*.whl | head -n1)"
"$work/venv/bin/python" "$pip_wheel/pip" install --quiet --no-index "$pip_wheel"
"$work/venv/bin/python" -m pip install --quiet --no-index --find-links "$bundle" \
    -r "$root/requirements/current.txt" "$bundle"/sal_detectron2-*.whl \
  || fail "installing .gpu/ failed (above: the package pip could not find offline): $rebuild"
install_s=$(( $(date +%s) - start ))

cd "$root"
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$work/venv/bin/python" -m d2_smallbn.gpu_check \
  --device "$device" --out "$out" --work "$work" --install-seconds "$install_s" \
  --budget "${GPU_CHECK_BUDGET_S:-480}" --started "$start"
