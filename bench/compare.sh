#!/usr/bin/env bash
# Speed and memory of `kcopyd copy` against dd and qemu-img convert on this machine.
# Usage: bench/compare.sh [--size-mib N] [--runs N] [--dir DIR] [--memory 16M] [--json OUT]
# Needs fio, GNU time and qemu-img; installs fio and time when run as root. Not part of CI: run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v fio >/dev/null; then
    if [ "$(id -u)" = 0 ]; then apt-get install -y -qq fio >/dev/null; else echo "compare: fio is needed" >&2; exit 2; fi
fi
[ -x /usr/bin/time ] || { [ "$(id -u)" = 0 ] && apt-get install -y -qq time >/dev/null; } || { echo "compare: GNU time (/usr/bin/time) is needed" >&2; exit 2; }
command -v qemu-img >/dev/null || { echo "compare: qemu-img is needed (qemu-utils)" >&2; exit 2; }
cargo build --release --quiet -p kcopyd-cli
exec python3 bench/compare.py "$@"
