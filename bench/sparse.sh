#!/usr/bin/env bash
# Sparse copies: `kcopyd copy` against `qemu-img convert` on an 8 GiB file holding 800 MiB, and
# on a fully allocated file. Usage: bench/sparse.sh [bench/sparse.py options]
# Needs qemu-img. Not part of CI: run it on a quiet machine, or read the alternating medians.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-img >/dev/null || { echo "sparse: qemu-img is needed (qemu-utils)" >&2; exit 2; }
cargo build --release --quiet -p kcopyd-cli
exec python3 bench/sparse.py "$@"
