#!/bin/sh
# Peak memory of the NBD client fed a flood of block-status chunks (48 × 16 MiB in one
# reply) by the misbehaving test server: the median of RUNS runs of
# tests/src/bin/nbd_reply_memory.rs. Usage: bench/nbd_reply_memory.sh [RUNS] [MISBEHAVIOUR]
set -eu
runs=${1:-5}
misbehaviour=${2:-BlockStatusFlood}
cargo build -q --release -p kcopyd-tests --bin nbd_reply_memory
results=$(mktemp)
trap 'rm -f "$results"' EXIT
i=0
while [ "$i" -lt "$runs" ]; do
  target/release/nbd_reply_memory "$misbehaviour" >> "$results"
  i=$((i + 1))
done
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
median = lambda key: statistics.median(row[key] for row in rows)
growth = statistics.median(row["peak_rss_kib_after"] - row["peak_rss_kib_before"] for row in rows)
print(f"{rows[0]['misbehaviour']}: peak RSS {median('peak_rss_kib_after') / 1024:.1f} MiB, "
      f"grew {growth / 1024:.1f} MiB during the request, {median('seconds'):.3f} s "
      f"(medians of {len(rows)} runs): {rows[0]['result']}")
PY
