# Sourced by up.sh and test.sh: makes the project's environments, installing what is missing.
# .venvs/maubot: maubot (the plugin's runtime) + test tools, pinned in pyproject.toml.
# .venvs/synapse: the homeserver, pinned in requirements-synapse.txt.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"

_venv() {  # _venv NAME PACKAGES...: (re)installs only when the package list changed
  local name="$1" dir="$ROOT/.venvs/$1"; shift
  local stamp; stamp="$(echo "$*" | sha256sum | cut -c1-16)"
  if [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$stamp" ]; then return; fi
  echo "==> installing the $name environment (.venvs/$name)" >&2
  "$PY" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@"
  echo "$stamp" > "$dir/.stamp"
}

ensure_python_envs() {
  # One requirement a line, read into arrays: never word-split or globbed by the shell
  # (`maubot[encryption]==…` is a glob pattern to bash).
  local -a deps synapse_deps
  mapfile -t deps < <("$PY" -c 'import tomllib; p = tomllib.load(open("'"$ROOT"'/pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["dev"]))')
  mapfile -t synapse_deps < <(grep -v -e '^#' -e '^[[:space:]]*$' "$ROOT/requirements-synapse.txt")
  _venv maubot "${deps[@]}"
  _venv synapse "${synapse_deps[@]}"
}

ensure_postgres() {
  if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then
    return
  fi
  echo "==> installing PostgreSQL (Debian package postgresql)" >&2
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q postgresql
}
