#!/usr/bin/env python3
"""How much the disk's speed differs between files: bench/nbd.py's ceiling (fio reading a source
file and writing a target file at once, O_DIRECT) on each of several target files of one
directory, in the same rounds.

Usage: bench/disk_files.py [--size-mib N] [--runs N] [--dir DIR] [--files N] [--compact-memory]

The files are made as bench/nbd.py makes its targets (written with zeroes, not fallocated) and
sit wherever the file system puts them. Each round runs the ceiling once per target file, each
round starting one file later. Reported per file: the median, fastest and slowest run, the
median against the fastest file's, and where the file starts on the disk (its first physical
block, from filefrag, when it is there). A ceiling measured on other files than the ones a copy
writes is off by the difference for the whole run: bench/nbd.py measures it on the copies' own
targets (docs/BENCHMARKS.md, "the ceiling on the copies' own files").

Needs fio (installed with apt-get when missing and run as root).
"""

import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

_spec = importlib.util.spec_from_file_location("nbd_bench", os.path.join(os.path.dirname(__file__), "nbd.py"))
nbd_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nbd_bench)


def first_block(path):
    """The first physical block of `path` as filefrag -v prints it, or '' when unknown."""
    if not shutil.which("filefrag"):
        return ""
    output = subprocess.run(["filefrag", "-v", path], capture_output=True, text=True).stdout.splitlines()
    for line in output:
        fields = line.split()
        if fields and fields[0].rstrip(":") == "0":
            return fields[3].rstrip(".:")
    return ""


def main():
    parser = nbd_bench.arguments(__doc__, runs=7)
    parser.add_argument("--files", type=int, default=4, help="target files (default 4)")
    parser.add_argument("--compact-memory", action="store_true",
                        help="compact the kernel's free memory before every run (root; as bench/nbd.py's)")
    args = parser.parse_args()
    if not nbd_bench.fio_available():
        sys.exit("disk files bench: needs fio")
    compact = args.compact_memory and nbd_bench.compact_memory_available()
    with tempfile.TemporaryDirectory(prefix="kcopyd-disk-files-", dir=args.dir) as work:
        source = os.path.join(work, "source.img")
        nbd_bench.make_source(source, args.size_mib)
        targets = [os.path.join(work, f"target{i}.img") for i in range(args.files)]
        for path in targets:
            nbd_bench.make_target(path, args.size_mib)
        times = {target: [] for target in targets}
        for round_, target in nbd_bench.rotation(targets, args.runs):
            if compact:
                nbd_bench.compact_memory()
            seconds, _ = nbd_bench.fio_ceiling(source, [target], args.size_mib)
            times[target].append(seconds)
            print(f"round {round_ + 1}: {os.path.basename(target)}: {seconds:.2f} s", flush=True)
        medians = {target: statistics.median(values) for target, values in times.items()}
        fastest = min(medians.values())
        print(f"\n{args.size_mib} MiB, fio reading {os.path.basename(source)} (first block "
              f"{first_block(source) or '?'}) and writing each file, medians of {args.runs} rounds"
              + (", memory compacted before every run" if compact else "") + ":")
        print(f"  {'file':12} {'first block':>12} {'median':>8} {'fastest':>8} {'slowest':>8} {'/fastest file':>14}")
        for target, median in medians.items():
            print(f"  {os.path.basename(target):12} {first_block(target):>12} {median:6.2f} s"
                  f" {min(times[target]):6.2f} s {max(times[target]):6.2f} s {median / fastest:14.2f}")
        print(f"  slowest file's median / fastest file's: {max(medians.values()) / fastest:.2f}")


if __name__ == "__main__":
    main()
