#!/usr/bin/env python3
"""Clone hydration over a slow link, measured: `kcopyd clone --serve` over a source served by
nbdkit behind its `rate` (link bandwidth) and `delay` (round trip) filters, with fio's nbd
engine doing random 4 KiB requests at a fixed rate against the served clone.

    source.img ─ nbdkit file + rate + delay ─ unix socket ─► kcopyd clone ─ served clone ─► fio (nbd)
                                                                 └─► dest.img (+ metadata)

Per run it reports the hydration time (from the clone's socket appearing to kcopyd's
"hydration complete") and the application's latency percentiles over the requests fio made
during hydration (fio's per-request latency log; fio is stopped when hydration completes).
Prints the median over RUNS and the matching simulator command (scenarios/clone-hydration-measured.toml).

    python3 bench/clone.py [--size 1G] [--runs 3] [--iops 2000] [--read-percent 70]
        [--delay-ms 2] [--rate 1G] [--region-size 64K] [--threshold 64] [--batch 16]
        [--kcopyd target/release/kcopyd] [--dir /var/tmp]

Needs nbdkit (with its rate and delay filters) and fio with the nbd engine; skips with a
printed reason when either is missing. Not part of CI: it takes a minute or two per run.
"""

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1G", help="source size (nbdkit/fio suffixes), default 1G")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--iops", type=int, default=2000, help="application requests per second")
    p.add_argument("--read-percent", type=int, default=70)
    p.add_argument("--queue-depth", type=int, default=64)
    p.add_argument("--delay-ms", type=float, default=2.0, help="nbdkit delay-read, the round trip")
    p.add_argument("--rate", default="1G", help="nbdkit rate= in bits per second, the link")
    p.add_argument("--region-size", default="64K")
    p.add_argument("--threshold", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--kcopyd", default="target/release/kcopyd")
    p.add_argument("--dir", default="/var/tmp", help="where the files go (the disk measured)")
    p.add_argument("--timeout", type=float, default=600.0, help="give up on a run after this long")
    return p.parse_args()


def skip(reason):
    print(f"clone bench skipped: {reason}")
    sys.exit(0)


def wait_for(path, timeout=30.0):
    """Until a unix socket at `path` accepts a connection (the file appears before the listen)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(path)
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens at {path} after {timeout} s")
            time.sleep(0.005)


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_source(args, work):
    sock = os.path.join(work, "source.sock")
    nbdkit = subprocess.Popen(
        ["nbdkit", "--foreground", "--readonly", "--unix", sock,
         "--filter=rate", "--filter=delay", "file", os.path.join(work, "source.img"),
         f"rate={args.rate}", "burstiness=0.01", f"delay-read={args.delay_ms}ms"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(sock)
    return nbdkit, sock


def fio_command(args, clone_sock, log_prefix):
    reads = args.iops * args.read_percent // 100
    return ["fio", "--name=app", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={clone_sock}",
            "--rw=randrw", f"--rwmixread={args.read_percent}", "--bs=4k", "--norandommap",
            f"--rate_iops={reads},{args.iops - reads}", f"--iodepth={args.queue_depth}",
            "--time_based", f"--runtime={int(args.timeout)}", f"--write_lat_log={log_prefix}",
            "--log_avg_msec=0", "--output-format=terse", "--output=/dev/null"]


def read_latencies_ms(log_prefix):
    """fio's per-request total latency log: time (ms), latency (ns), direction, size, …"""
    latencies = []
    with open(f"{log_prefix}_lat.1.log") as log:
        for line in log:
            fields = line.split(",")
            if len(fields) >= 2:
                latencies.append(int(fields[1]) / 1e6)
    return latencies


def one_run(args, work):
    for name in ("dest.img", "clone.meta", "clone.sock", "source.sock"):
        if os.path.exists(os.path.join(work, name)):
            os.remove(os.path.join(work, name))
    nbdkit, source_sock = start_source(args, work)
    clone_sock = os.path.join(work, "clone.sock")
    fio = None
    kcopyd = subprocess.Popen(
        [args.kcopyd, "clone", f"nbd+unix:///?socket={source_sock}", os.path.join(work, "dest.img"),
         "--metadata", os.path.join(work, "clone.meta"), "--serve", f"nbd+unix:///?socket={clone_sock}",
         "--region-size", args.region_size, "--hydration-threshold", str(args.threshold),
         "--hydration-batch-size", str(args.batch), "--quiet"],
        stderr=subprocess.PIPE, text=True)
    try:
        try:
            wait_for(clone_sock, timeout=120.0)
        except RuntimeError:
            kcopyd.terminate()
            raise RuntimeError(f"kcopyd clone did not serve: {kcopyd.communicate()[1].strip()}")
        start = time.monotonic()
        log_prefix = os.path.join(work, "app")
        fio = subprocess.Popen(fio_command(args, clone_sock, log_prefix),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for line in kcopyd.stderr:
            if "hydration complete" in line:
                break
        hydration_s = time.monotonic() - start
        # fio first (it writes its log on SIGINT), then the clone (it serves until a signal).
        fio.send_signal(signal.SIGINT)
        fio.wait(timeout=60)
        kcopyd.send_signal(signal.SIGTERM)
        kcopyd.wait(timeout=60)
        latencies = read_latencies_ms(log_prefix)
    finally:
        if fio is not None and fio.poll() is None:
            fio.kill()
            fio.wait()
        for process in (kcopyd, nbdkit):
            if process.poll() is None:
                process.terminate()
                process.wait()
    return hydration_s, latencies


def main():
    args = parse_args()
    for tool in ("nbdkit", "fio"):
        if shutil.which(tool) is None:
            skip(f"{tool} is not installed")
    if not os.path.exists(args.kcopyd):
        skip(f"{args.kcopyd} is not built (cargo build --release -p kcopyd-cli)")
    with tempfile.TemporaryDirectory(prefix="kcopyd-clone-bench.", dir=args.dir) as work:
        subprocess.run(["fio", "--name=fill", f"--filename={os.path.join(work, 'source.img')}", "--rw=write",
                        "--bs=1M", f"--size={args.size}", "--refill_buffers", "--output=/dev/null"], check=True)
        rows = []
        for run in range(args.runs):
            hydration_s, latencies = one_run(args, work)
            row = (hydration_s, percentile(latencies, 0.5), percentile(latencies, 0.99), len(latencies))
            rows.append(row)
            print(f"run {run + 1}: hydration {row[0]:.2f} s; application p50 {row[1]:.3f} ms, "
                  f"p99 {row[2]:.3f} ms ({row[3]} requests)", flush=True)
    print(f"median of {args.runs}: hydration {statistics.median(r[0] for r in rows):.2f} s; application "
          f"p50 {statistics.median(r[1] for r in rows):.3f} ms, p99 {statistics.median(r[2] for r in rows):.3f} ms")
    print("simulator: cargo run --release -p kcopyd-clone --example clone-sim -- scenarios/clone-hydration-measured.toml "
          f"--set disks.source.len_sectors={args.size} --set disks.destination.len_sectors={args.size}")


if __name__ == "__main__":
    main()
