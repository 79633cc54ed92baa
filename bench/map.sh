#!/usr/bin/env bash
# Copy maps of a million ranges: `map show`, a `--retry-failed` resume and a plain resume,
# timed with GNU time (wall seconds, peak RSS), medians. Usage: bench/map.sh [bench/map.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x /usr/bin/time ] || { echo "map: GNU time (/usr/bin/time) is needed" >&2; exit 2; }
cargo build --release --quiet -p kcopyd-cli
exec python3 bench/map.py "$@"
