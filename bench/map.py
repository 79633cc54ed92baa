#!/usr/bin/env python3
"""Copy maps: `kcopyd map show` and resumed copies of a map holding a million ranges.

Usage: bench/map.py [--ranges 1000000] [--stride-sectors 2] [--runs 5] [--dir DIR]
                    [--kcopyd PATH] [--json OUT]

A source file of ranges x stride sectors of random data is copied once with --map, so that the
map's header (with the devices' identities) is the command's own. Then three maps are written
from it, each with --ranges one-sector ranges, one every --stride-sectors sectors:

  show     `done` over the whole copy, then a `read-failed` line per range
           (a rescue that met a million bad sectors): `kcopyd map show` of it.
  retry    the same map: `copy --map --retry-failed` copies the million failed ranges again.
  resume   a `done` line per range, the sectors between them never copied:
           `copy --map` copies the million remaining ranges.

Each command runs --runs times under GNU time (wall seconds, peak RSS), the map rewritten
before every run. Goal: every median under 5 s and 200 MiB. Medians are printed, and written as
JSON with --json.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

MIB = 1 << 20


def make_source(path, size_bytes):
    with open(path, "wb") as f:
        left = size_bytes
        while left:
            chunk = min(left, 16 * MIB)
            f.write(os.urandom(chunk))
            left -= chunk
        f.flush()
        os.fsync(f.fileno())


def header_of(kcopyd, source, target, map_path):
    """The header a real run writes (the run copies everything)."""
    for path in (target, map_path):
        if os.path.exists(path):
            os.remove(path)
    subprocess.run([kcopyd, "copy", source, target, "--map", map_path, "-q"], check=True)
    with open(map_path) as f:
        lines = f.read().splitlines(keepends=True)
    end = next(i for i, line in enumerate(lines) if line.startswith("length "))
    return "".join(lines[: end + 1])


def write_map(path, header, records):
    with open(path, "w") as f:
        f.write(header)
        f.writelines(records)


def timed(command, map_path, map_text):
    """Rewrites the map, runs `command` under GNU time: (seconds, peak RSS in MiB)."""
    with open(map_path, "w") as f:
        f.write(map_text)
    process = subprocess.run(
        ["/usr/bin/time", "-f", "%e %M"] + command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if process.returncode != 0:
        sys.exit(f"map: {' '.join(command)} failed ({process.returncode}): {process.stderr.strip()}")
    seconds, rss_kib = process.stderr.strip().splitlines()[-1].split()
    return float(seconds), int(rss_kib) / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranges", type=int, default=1_000_000)
    parser.add_argument("--stride-sectors", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--kcopyd", default="target/release/kcopyd")
    parser.add_argument("--json")
    args = parser.parse_args()
    if shutil.which("/usr/bin/time") is None:
        sys.exit("map: GNU time (/usr/bin/time) is needed")
    work = os.path.join(args.dir, f"kcopyd-bench-map-{os.getpid()}")
    os.makedirs(work)
    try:
        results = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def run(args, work):
    source, target, map_path = (os.path.join(work, name) for name in ("source.img", "target.img", "copy.map"))
    len_sectors = args.ranges * args.stride_sectors
    make_source(source, len_sectors * 512)
    header = header_of(args.kcopyd, source, target, map_path)
    starts = range(0, len_sectors, args.stride_sectors)
    failed = header + f"done 0 {len_sectors}\n" + "".join(f"read-failed {s} {s + 1}\n" for s in starts)
    holes = header + "".join(f"done {s} {s + 1}\n" for s in starts)
    copy = [args.kcopyd, "copy", source, target, "--map", map_path, "-q"]
    cases = {
        "show": ([args.kcopyd, "map", "show", map_path], failed),
        "retry": (copy + ["--retry-failed"], failed),
        "resume": (copy, holes),
    }
    results = {"ranges": args.ranges, "stride_sectors": args.stride_sectors, "runs": args.runs, "cases": {}}
    print(f"{args.ranges} ranges, one every {args.stride_sectors} sectors ({len_sectors * 512 // MIB} MiB copy)")
    for name, (command, text) in cases.items():
        runs = [timed(command, map_path, text) for _ in range(args.runs)]
        seconds = statistics.median(r[0] for r in runs)
        rss = statistics.median(r[1] for r in runs)
        if name != "show" and subprocess.run(["cmp", "-s", source, target]).returncode != 0:
            sys.exit(f"map: {name}: the target differs from the source")
        results["cases"][name] = {"median_seconds": seconds, "median_rss_mib": rss, "runs": runs}
        verdict = "ok" if seconds < 5 and rss < 200 else "OVER THE GOAL"
        print(f"{name:<7} median {seconds:6.2f} s  {rss:7.1f} MiB peak RSS  ({verdict})")
    return results


if __name__ == "__main__":
    main()
