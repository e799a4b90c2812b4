# Sourced by scripts/test.sh and scripts/run.sh: finds ComfyUI and a Python that can run it.
# Sets COMFYUI_PATH, PY and PACK. Creates a cached virtual environment (one per ComfyUI requirements
# file) only when the current Python lacks what that ComfyUI imports at start-up; a ComfyUI install's
# own Python is reused. A script that defines a function `before_setup` has it called with the base Python just
# before an environment is built; a non-zero status exits.
set -euo pipefail
PACK="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"  # logical path: keeps custom_nodes/ symlinks

if [ -z "${COMFYUI_PATH:-}" ]; then
  for candidate in "$PACK/../.." "$PACK/../shared/ComfyUI"; do
    candidate="$(cd "$candidate" 2>/dev/null && pwd)" || continue  # `cd` resolves `..` logically: custom_nodes/<link>/../.. is ComfyUI
    if [ -f "$candidate/comfy/model_management.py" ]; then COMFYUI_PATH="$candidate"; break; fi
  done
fi
if [ -z "${COMFYUI_PATH:-}" ] || [ ! -f "$COMFYUI_PATH/comfy/model_management.py" ]; then
  echo "ComfyUI not found: run this from ComfyUI/custom_nodes/<this pack>, or set COMFYUI_PATH=/path/to/ComfyUI" >&2
  exit 2
fi
export COMFYUI_PATH

# Ready = every requirement of this ComfyUI (its requirements.txt, non-essential lines too) is installed
# at a matching version, and the torch family imports (a mismatched torchvision/torchaudio fails only at import).
runtime_ok() { "$1" "$PACK/scripts/check_runtime.py" "$COMFYUI_PATH/requirements.txt" >/dev/null 2>&1; }

PY="${PYTHON:-$(command -v python3 || command -v python || true)}"
if [ -z "$PY" ] || ! runtime_ok "$PY"; then
  base="$(command -v python3.11 || command -v python3)"
  key="$( (cat "$COMFYUI_PATH/requirements.txt"; echo torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0; "$base" --version) | sha1sum | cut -c1-12)"
  venv="${HA_VENV_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-harmonizing-attention/venv-$key}"
  if [ ! -x "$venv/bin/python" ] || ! runtime_ok "$venv/bin/python"; then
    # the caller's quick checks first (run.sh: its options, image files and checkpoint), not minutes later
    if declare -F before_setup >/dev/null; then before_setup "$base" || exit $?; fi
    echo "setting up a Python environment for ComfyUI $(basename "$COMFYUI_PATH") in $venv (a few minutes, once)" >&2
    rm -rf "$venv"
    "$base" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    # pinned family: torchvision/torchaudio must match torch, else ComfyUI fails at import
    torch_family="torch==2.14.1 torchvision==0.29.1"
    grep -qiE '^\s*torchaudio\s*($|[<>=~!;])' "$COMFYUI_PATH/requirements.txt" && torch_family="$torch_family torchaudio==2.11.0"
    "$venv/bin/pip" install -q $torch_family
    grep -viE '^\s*(torch|torchvision|torchaudio)\s*($|[<>=~!;])' "$COMFYUI_PATH/requirements.txt" > "$venv/comfyui-requirements.txt"
    "$venv/bin/pip" install -q -r "$venv/comfyui-requirements.txt" requests
  fi
  PY="$venv/bin/python"
fi
export PY PACK
