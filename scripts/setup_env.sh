#!/usr/bin/env bash
# Creates (or reuses) the environment of one supported stack and prints its Python.
#
#   scripts/setup_env.sh [pinned|current|gpu-standin]      (default: pinned)
#
#   pinned   ./.venv          Python 3.10, torch 2.3.1, numpy<2, detectron2 = the sal-detectron2 wheel
#                             (upstream a59f0563 with its compiled _C)            requirements/pinned.txt
#   current  ./.venv-current  Python 3.12, torch 2.11.0, torchvision 0.26.0, numpy 2, detectron2's
#                             Python files without _C        requirements/current-base.txt + current.txt
#   gpu-standin               the "current-base" layer alone: the GPU machine's preinstalled packages,
#                             on which GPU_CHECK_DEVICE=cpu bash tools/gpu_check.sh rehearses the check
#
# Dependencies are installed once into layers under ~/.cache/d2_smallbn (D2_SMALLBN_ENV_CACHE),
# each keyed by the hash of its requirements (and of the layers below it). The current stack has two
# layers: "current-base" holds what the GPU machine has preinstalled, so that it also serves as the
# GPU check's CPU stand-in (tools/gpu_check.sh), and "current-deps" the rest. Each checkout gets a
# small venv of its own that sees its layers through a .pth file and holds an editable install of
# that checkout (with its console scripts; redone when setup.py changes). Re-running is fast and changes nothing; an interrupted build has no marker and is redone.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
stack="${1:-pinned}"
cache="${D2_SMALLBN_ENV_CACHE:-$HOME/.cache/d2_smallbn}"
STACKS="pinned current gpu-standin"

log() { echo "setup_env: $*" >&2; }

find_python() {  # find_python 3.10 -> a CPython of that version
  local want="$1" override="$2" candidate
  for candidate in $override "python$want" "$HOME/.pyenv/versions/$want"*/bin/python /root/.pyenv/versions/"$want"*/bin/python; do
    # pyenv shims exist for versions that are not selected, so ask each candidate itself
    if "$candidate" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$want'.split('.'))))" \
        >/dev/null 2>&1; then
      echo "$candidate"; return 0
    fi
  done
  log "Python $want not found. The $stack stack needs CPython $want: install it (e.g. pyenv install $want)"
  log "or point the variable named below at one."
  return 1
}

site_of() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }

# layer NAME KEY PYTHON INSTALL_FUNCTION [LOWER_LAYER_DIRS...] -> prints the layer's directory
layer() {
  local name="$1" key="$2" python="$3" install="$4"; shift 4
  local dir="$cache/$name-$key" lower
  if [ ! -f "$dir/.complete" ]; then
    log "installing $name into $dir (a few minutes on a fresh machine)"
    rm -rf "$dir"
    "$python" -m venv "$dir"
    for lower in "$@"; do site_of "$lower/bin/python"; done > "$(site_of "$dir/bin/python")/d2_smallbn_lower.pth"
    "$dir/bin/python" -m pip install --quiet --upgrade pip
    "$install" "$dir"
    touch "$dir/.complete"
  fi
  echo "$dir"
}

install_requirements() { "$1/bin/python" -m pip install --quiet -r "$requirements"; }

install_current_deps() {
  "$1/bin/python" -m pip install --quiet -r "$root/requirements/current.txt"
  local wheels="$cache/wheels-$(hash_of "$root/scripts/detectron2_wheel.py")"
  [ -f "$wheels/sal_detectron2-0.7.2-py3-none-any.whl" ] || "$1/bin/python" "$root/scripts/detectron2_wheel.py" "$wheels" >/dev/null
  "$1/bin/python" -m pip install --quiet --no-deps "$wheels/sal_detectron2-0.7.2-py3-none-any.whl"
}

# checkout_venv PATH PYTHON KEY LAYER_DIRS...: the checkout's own venv over the layers
checkout_venv() {
  local venv="$1" python="$2" key="$3"; shift 3
  if [ -L "$venv" ] || { [ -e "$venv" ] && [ ! -f "$venv/.d2_smallbn-$key" ]; }; then
    rm -rf "$venv"  # an older layout or other dependencies
  fi
  if [ ! -f "$venv/.d2_smallbn-$key" ]; then
    "$python" -m venv "$venv"
    local lower
    for lower in "$@"; do site_of "$lower/bin/python"; done > "$(site_of "$venv/bin/python")/d2_smallbn_deps.pth"
    # Editable install of this checkout only; no dependencies, so a user's own detectron2 is never touched.
    "$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$root"
    touch "$venv/.d2_smallbn-$key"
  fi
  log "ready ($stack): $venv"
  echo "$venv/bin/python"
}

case "$stack" in
  pinned)
    python="$(find_python 3.10 "${D2_SMALLBN_PYTHON:-}")" || { log "(D2_SMALLBN_PYTHON)"; exit 1; }
    requirements="$root/requirements/pinned.txt"
    key="$(hash_of "$requirements")"
    deps="$(layer deps "$key" "$python" install_requirements)"
    checkout_venv "$root/.venv" "$python" "$(echo "$key" | cat - "$root/setup.py" | sha256sum | cut -c1-16)" "$deps"
    ;;
  current|gpu-standin)
    python="$(find_python 3.12 "${D2_SMALLBN_PYTHON312:-}")" || { log "(D2_SMALLBN_PYTHON312)"; exit 1; }
    requirements="$root/requirements/current-base.txt"
    base_key="$(hash_of "$requirements")"
    base="$(layer current-base "$base_key" "$python" install_requirements)"
    if [ "$stack" = gpu-standin ]; then
      log "ready ($stack): $base"
      echo "$base/bin/python"; exit 0
    fi
    key="$(echo "$base_key" | cat - "$root/requirements/current.txt" "$root/scripts/detectron2_wheel.py" | sha256sum | cut -c1-16)"
    deps="$(layer current-deps "$key" "$python" install_current_deps "$base")"
    checkout_venv "$root/.venv-current" "$python" "$(echo "$key" | cat - "$root/setup.py" | sha256sum | cut -c1-16)" \
      "$deps" "$base"
    ;;
  *)
    log "unknown stack '$stack'; valid stacks: $STACKS (e.g. make env STACK=current)"
    exit 2
    ;;
esac
