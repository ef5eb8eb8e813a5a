#!/usr/bin/env bash
# The one prepared GPU check (scripts/gpu_check.py says what it runs and writes):
#   bash scripts/gpu_check.sh OUT [--dry] [--parts methods table3 layer merge table2] [--cells ...] [--runs DIR]
#                                 [--methods-s S] [--table3-s S] [--layer-s S] [--merge-s S] [--table2-s S]
# Offline by design: nothing is downloaded; the project's .venv is used where there is one, else python3 (a GPU node
# with its own torch, after `python -m pip install --no-index --find-links wheelhouse -r wheelhouse/requirements.txt`).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x "$here/../.venv/bin/python" ]; then python="$here/../.venv/bin/python"; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
exec "$python" "$here/gpu_check.py" "$@"
