#!/usr/bin/env bash
# Creates (or reuses) the project's Python 3.10 environment at ./.venv.
#
# The pinned dependencies (~5 GB) are installed once into a cache keyed by the hash of
# requirements/pinned.txt (~/.cache/d2_smallbn/deps-<hash>). Each checkout gets a small venv of
# its own that sees the cache through a .pth file and holds an editable install of that checkout,
# so several clones share one install without pointing at each other's code.
# Re-running is fast and changes nothing; an interrupted build has no marker and is redone.
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

key="$(sha256sum < "$req" | cut -c1-16)"
deps="${D2_SMALLBN_ENV_CACHE:-$HOME/.cache/d2_smallbn}/deps-$key"
if [ ! -f "$deps/.complete" ]; then
  echo "setup_env: installing the pinned stack into $deps (about 2-3 minutes on a fresh machine)"
  rm -rf "$deps"
  "$python" -m venv "$deps"
  "$deps/bin/python" -m pip install --quiet --upgrade pip
  "$deps/bin/python" -m pip install --quiet -r "$req"
  touch "$deps/.complete"
fi

venv="$root/.venv"
if [ -L "$venv" ] || { [ -e "$venv" ] && [ ! -f "$venv/.d2_smallbn-$key" ]; }; then
  rm -rf "$venv"  # an older layout or other pinned deps
fi
if [ ! -f "$venv/.d2_smallbn-$key" ]; then
  "$python" -m venv "$venv"
  deps_site="$("$deps/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  venv_site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$deps_site" > "$venv_site/d2_smallbn_deps.pth"
  # Editable install of this checkout only; no dependencies, so a user's own detectron2 is never touched.
  "$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$root"
  touch "$venv/.d2_smallbn-$key"
fi
echo "setup_env: ready: $venv"
