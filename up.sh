#!/usr/bin/env bash
# Brings up the whole thing locally and keeps it running until Ctrl-C: Synapse on 127.0.0.1,
# maubot, this plugin built and uploaded, the bot client and instance (echo agent), a demo user.
# State lives in .stack/ (delete it for a fresh start).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
ensure_python_envs
exec env LAMBDA_SYNAPSE_PYTHON="$ROOT/.venvs/synapse/bin/python" \
  .venvs/maubot/bin/python -m devstack up "$@"
