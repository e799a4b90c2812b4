#!/usr/bin/env bash
# The test command: bash scripts/test.sh [pytest arguments]
# Runs the suite in-process against the real ComfyUI (CPU, tiny random-weight models).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
extras="$("$PY" -c "import tomllib; print(' '.join(tomllib.load(open('$PACK/pyproject.toml', 'rb'))['project']['optional-dependencies']['test']))")"
"$PY" -m pip install -q $extras  # the test extras (pyproject.toml); quick when already satisfied
cd "$PACK"
echo "ComfyUI: $COMFYUI_PATH  Python: $PY" >&2
exec "$PY" -m pytest "$@"
