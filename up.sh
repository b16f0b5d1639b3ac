#!/usr/bin/env bash
# Brings up the whole thing locally and keeps it running until Ctrl-C: Synapse on 127.0.0.1,
# maubot, this plugin built and uploaded, the bot client and instance (echo agent), a demo user.
# State lives in .stack/ (delete it for a fresh start).
#   ./up.sh [--workspace DIR]             the stack (DIR: shared workspace for files)
#   ./up.sh --federated [...]             plus a second homeserver federating with the bot's
#                                         and a demo user there (state in .stack/federated/)
#   ./up.sh reset local|server [--dry-run] [--federated]  dev reset of the running stack,
#                                         from another terminal
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
ensure_python_envs
command=up
if [ "${1:-}" = "reset" ]; then command=reset; shift; fi
exec env LAMBDA_SYNAPSE_PYTHON="$ROOT/.venvs/synapse/bin/python" \
  .venvs/maubot/bin/python -m devstack "$command" "$@"
