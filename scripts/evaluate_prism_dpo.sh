#!/usr/bin/env bash
# evaluate_dpo.sh on PRISM (DATA default runs/data/prism); same environment variables.
set -euo pipefail
cd "$(dirname "$0")/.."
export DATA="${DATA:-runs/data/prism}"
exec scripts/evaluate_dpo.sh "$@"
