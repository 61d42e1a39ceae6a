#!/usr/bin/env bash
# Build the benchmark-only venv for the peer tool cNMF at benchmarks/peers/.venv
# from the pins in benchmarks/peers/requirements.txt.
# This environment is never part of the project's runtime lock (requirements.lock).
#
# Idempotent: when .venv/.installed is newer than requirements.txt (and the venv's
# python runs) it does nothing. Override the interpreter with PYTHON=/path/to/python3.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
REQS="$HERE/requirements.txt"
STAMP="$VENV/.installed"
PYTHON="${PYTHON:-python3}"

if [[ -f "$STAMP" && "$STAMP" -nt "$REQS" && -x "$VENV/bin/python" ]] \
   && "$VENV/bin/python" -c 'from importlib.metadata import version; version("cnmf")' >/dev/null 2>&1; then
    echo "peer venv up to date: $VENV"
    exit 0
fi

"$PYTHON" -c 'import sys; sys.exit("benchmarks/peers needs Python >= 3.11 (the pins need it), found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'

if [[ ! -x "$VENV/bin/python" ]]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
fi
rm -f "$STAMP"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS"
"$VENV/bin/python" -c 'import cnmf' >/dev/null
touch "$STAMP"
echo "peer venv ready: $VENV (cnmf $("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("cnmf"))'))"
