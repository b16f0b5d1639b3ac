#!/usr/bin/env bash
# Builds dist/<id>-v<version>.mbp from the files git tracks (plugin code, maubot.yaml,
# base-config.yaml; never tests or caches) and prints its path.
set -euo pipefail
cd "$(dirname "$0")"
python3 - <<'PY'
import re
import subprocess
import zipfile
from pathlib import Path

meta = Path("maubot.yaml").read_text()
plugin_id = re.search(r"^id:\s*(\S+)", meta, re.M).group(1)
version = re.search(r"^version:\s*(\S+)", meta, re.M).group(1)
tracked = subprocess.run(
    ["git", "ls-files", "-z", "--", "maubot.yaml", "base-config.yaml", "lambda_plugin"],
    check=True, capture_output=True, text=True,
).stdout.split("\0")
files = sorted(f for f in tracked if f and Path(f).is_file() and "__pycache__" not in f)
if "maubot.yaml" not in files or not any(f.startswith("lambda_plugin/") for f in files):
    raise SystemExit("build.sh: maubot.yaml or lambda_plugin/ is not tracked by git")
out = Path("dist") / f"{plugin_id}-v{version}.mbp"
out.parent.mkdir(exist_ok=True)
tmp = out.with_suffix(".tmp")
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as mbp:
    for name in files:
        # A fixed timestamp makes the same sources give the same bytes.
        info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        mbp.writestr(info, Path(name).read_bytes())
tmp.replace(out)
print(out.resolve())
PY
