#!/usr/bin/env bash
# Creates (or reuses) the project's Python 3.10 environment with the pinned stack, and
# links it at ./.venv. The environment lives in a cache keyed by the hash of the pinned
# requirements, so re-running is instant and several clones share one ~5 GB install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
req="$root/requirements/pinned.txt"
python="${D2_SMALLBN_PYTHON:-}"
if [ -z "$python" ]; then
  for candidate in python3.10 "$HOME/.pyenv/versions/3.10.13/bin/python" /root/.pyenv/versions/3.10.13/bin/python; do
    # pyenv shims exist for versions that are not selected, so ask each candidate itself
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' >/dev/null 2>&1; then
      python="$candidate"; break
    fi
  done
fi
if [ -z "$python" ]; then
  echo "setup_env: Python 3.10 not found. The pinned detectron2 wheel needs CPython 3.10;" >&2
  echo "install it or set D2_SMALLBN_PYTHON=/path/to/python3.10." >&2
  exit 1
fi
key="$(cat "$req" | sha256sum | cut -c1-16)"
cache="${D2_SMALLBN_ENV_CACHE:-$HOME/.cache/d2_smallbn}/venv-$key"
if [ ! -f "$cache/.complete" ]; then
  # An interrupted build never has the marker, so it is discarded and rebuilt, never half-used.
  echo "setup_env: building $cache (about 2-3 minutes on a fresh machine)"
  rm -rf "$cache"
  "$python" -m venv "$cache"
  "$cache/bin/python" -m pip install --quiet --upgrade pip
  "$cache/bin/python" -m pip install --quiet -r "$req"
  touch "$cache/.complete"
fi
ln -sfn "$cache" "$root/.venv"
# Editable install of this package; no dependencies, so a user's own detectron2 is never touched.
if ! (cd / && "$root/.venv/bin/python" -c "import d2_smallbn, os, sys; sys.exit(0 if os.path.dirname(os.path.dirname(d2_smallbn.__file__)) == '$root' else 1)") 2>/dev/null; then
  "$root/.venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$root"
fi
echo "setup_env: ready: $root/.venv"
