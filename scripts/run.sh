#!/usr/bin/env bash
# The main job: bash scripts/run.sh --ckpt <checkpoint> [scripts/run_workflow.py options]
# Runs a shipped workflow headlessly on the shipped example images and writes the output image.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$PY" "$PACK/scripts/run_workflow.py" "$@"
