#!/usr/bin/env bash
# The main job and the install check (README: "From the command line"):
#   bash scripts/run.sh --ckpt sd-v1-5-inpainting.safetensors                   the example images
#   bash scripts/run.sh --source A.jpg --mask M.png --target B.jpg --ckpt ...   your own photos, any folder
#   bash scripts/run.sh --check                                                 check the install: tiny random model
#   bash scripts/run.sh --help                                                  the workflow's images and widgets
scripts="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
for arg in "$@"; do  # the help needs no environment: the standard library reads the workflow
  case "$arg" in -h|--help) exec "$(command -v python3 || command -v python)" "$scripts/run_workflow.py" "$@";; esac
done
args=("$@")
# called by env.sh only when it is about to build an environment: refuse a missing checkpoint or image file first
before_setup() { "$1" "$scripts/run_workflow.py" --preflight ${args[@]+"${args[@]}"}; }
source "$scripts/env.sh"
exec "$PY" "$PACK/scripts/run_workflow.py" "$@"
