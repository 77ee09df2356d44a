#!/usr/bin/env bash
# Writes .gpu/: what the offline GPU machine lacks, as wheels for CPython 3.12 (docs/gpu.md).
#
#   - every package of requirements/current.txt (pure-Python sdists are built into wheels here);
#   - detectron2's Python package: the pinned sal-detectron2 wheel without _C (scripts/detectron2_wheel.py);
#   - pip itself, so that the check installs with a known pip into a venv created --without-pip;
#   - BUNDLE: the inputs' hash and the list of wheels, which tools/gpu_check.sh checks first.
#
# Needs the registry (run it where the project is developed); reuses .gpu/ when its inputs are unchanged.
# At most 64 MiB, the limit on what travels beside the checkout.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bundle="$root/.gpu"
limit_mib=64
key="$(cat "$root/requirements/current.txt" "$root/scripts/detectron2_wheel.py" "$0" | sha256sum | cut -c1-16)"
if [ -f "$bundle/BUNDLE" ] && head -n1 "$bundle/BUNDLE" | grep -qx "key $key"; then
  echo "gpu_bundle: $bundle is up to date"; exit 0
fi

python="$(bash "$root/scripts/setup_env.sh" current)"  # a CPython 3.12 with pip: wheels for the GPU's Python
tmp="$bundle.partial"
rm -rf "$tmp" && mkdir -p "$tmp"
"$python" -m pip wheel --quiet --no-deps -r "$root/requirements/current.txt" -w "$tmp"
"$python" "$root/scripts/detectron2_wheel.py" "$tmp" >/dev/null
"$python" -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "pip==$("$python" -m pip --version | cut -d' ' -f2)"
{ echo "key $key"; (cd "$tmp" && ls -1 ./*.whl | sed 's|^\./||'); } > "$tmp/BUNDLE"
size_mib=$(( $(du -sk "$tmp" | cut -f1) / 1024 ))
if [ "$size_mib" -gt "$limit_mib" ]; then
  echo "gpu_bundle: $size_mib MiB is over the $limit_mib MiB that may travel with the checkout" >&2; exit 1
fi
rm -rf "$bundle" && mv "$tmp" "$bundle"
echo "gpu_bundle: wrote $bundle ($size_mib MiB, $(($(wc -l < "$bundle/BUNDLE") - 1)) wheels)"
