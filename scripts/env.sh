# Sourced by scripts/test.sh and scripts/run.sh: finds ComfyUI and a Python that can run it.
# Sets COMFYUI_PATH, PY and PACK. Creates a cached virtual environment only when the current
# Python lacks ComfyUI's requirements (a fresh machine); a ComfyUI install's own Python is reused.
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

runtime_ok() { "$1" -c "import torch, torchvision, safetensors, einops, transformers, aiohttp, yaml, PIL, scipy, av, psutil" 2>/dev/null; }

PY="${PYTHON:-$(command -v python3 || command -v python || true)}"
if [ -z "$PY" ] || ! runtime_ok "$PY"; then
  base="$(command -v python3.11 || command -v python3)"
  key="$( (cat "$COMFYUI_PATH/requirements.txt"; echo torch==2.14.1 torchvision==0.29.1; "$base" --version) | sha1sum | cut -c1-12)"
  venv="${HA_VENV_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-harmonizing-attention/venv-$key}"
  if [ ! -x "$venv/bin/python" ] || ! runtime_ok "$venv/bin/python"; then
    echo "setting up a Python environment for ComfyUI in $venv (a few minutes, once)" >&2
    rm -rf "$venv"
    "$base" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    # pinned pair: torchvision must match torch, else ComfyUI fails at import
    "$venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
    grep -viE '^\s*(torch|torchvision|torchaudio)\s*($|[<>=~!;])' "$COMFYUI_PATH/requirements.txt" > "$venv/comfyui-requirements.txt"
    "$venv/bin/pip" install -q -r "$venv/comfyui-requirements.txt" requests
  fi
  PY="$venv/bin/python"
fi
export PY PACK
