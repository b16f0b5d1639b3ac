#!/usr/bin/env bash
# Runs every benchmark on a Synapse + maubot + plugin stack of its own (started here, stopped
# at the end, also on Ctrl-C), prints the figures next to the goals and writes
# bench/results/latest.json, or bench/results/quick.json with --quick (small sizes, < 5 min).
# The full run measures the plugin database on SQLite and on PostgreSQL (a stack each), the
# quick run on SQLite; --engines sqlite,postgres (or --engine E) chooses.
# Other options: --only reconcile,latency,faults  --profile  --set KEY=JSON  --keep  --out FILE
# (faults, last on each stack, kills and restarts maubot, Synapse and PostgreSQL under it:
# bench/run.sh --quick --only faults [--engine postgres] runs it alone.)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_python_envs
args=" $* "
if [[ "$args" == *postgres* ]] || [[ "$args" != *" --quick "* && "$args" != *" --engine"* ]]; then
  ensure_postgres
fi
export LAMBDA_SYNAPSE_PYTHON="$ROOT/.venvs/synapse/bin/python"
exec .venvs/maubot/bin/python -m bench "$@"
