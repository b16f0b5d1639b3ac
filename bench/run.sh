#!/usr/bin/env bash
# Runs every benchmark on a Synapse + maubot + plugin stack of its own (started here, stopped
# at the end, also on Ctrl-C), prints the figures next to the goals and writes
# bench/results/latest.json, or bench/results/quick.json with --quick (small sizes, < 5 min).
# Other options: --only reconcile,latency  --profile  --engine postgres  --set KEY=JSON  --keep
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_python_envs
if [[ " $* " == *" --engine postgres "* ]]; then ensure_postgres; fi
export LAMBDA_SYNAPSE_PYTHON="$ROOT/.venvs/synapse/bin/python"
exec .venvs/maubot/bin/python -m bench "$@"
