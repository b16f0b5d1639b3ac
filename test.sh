#!/usr/bin/env bash
# Runs every test: lint, unit tests, and the real-level tests on a real Synapse + maubot with
# the plugin database on SQLite and on PostgreSQL. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
ensure_python_envs
ensure_postgres
scripts/install-browser.sh
.venvs/maubot/bin/ruff check .
.venvs/maubot/bin/mypy lambda_plugin
exec env LAMBDA_SYNAPSE_PYTHON="$ROOT/.venvs/synapse/bin/python" \
  .venvs/maubot/bin/python -m pytest "$@"
