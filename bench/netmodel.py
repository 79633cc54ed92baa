#!/usr/bin/env python3
"""The simulator's network link model, checked: real copies over NBD through nbdkit's `rate`
filter (the link's bandwidth, a token bucket) and `delay` filter (every request's round trip),
beside `kcopyd sim validate-link`'s predictions, for a matrix of bandwidth × round trip ×
sub-jobs in flight.

    nbdkit pattern (source, unix socket) ─► kcopyd copy ─► nbdkit rate + delay + memory (target)
                                                      (or the filters in front of the source)

First the two exports are measured without filters (the disk behind the link: NBD over a unix
socket to nbdkit's memory and pattern plugins): copies one sub-job at a time at three sizes
give a fixed cost and a cost per byte (a least-squares line), written as a disk model
(`one_device`: the engine and both servers share this machine's CPUs), again before each
combination (the cost moves with the machine's load). Then, per combination, a fresh export
behind the filters and `kcopyd sim validate-link` with that model and
the link's parameters: the prediction, the measured median and the error per configuration.

    python3 bench/netmodel.py [--runs 3] [--seconds 2.5] [--burstiness 0.01]
        [--combos 50:1,50:5,200:1,200:5,50:5:source] [--configs 1Mx1x1,1Mx4x1,1Mx16x1,256Kx4x1]
        [--burstiness 0.025] [--maxdata 0]
        [--kcopyd target/release/kcopyd] [--json FILE]

A combination is MB_PER_S:RTT_MS[:source|target] (the end behind the link; target by
default). nbdkit's delay filter takes whole milliseconds: 0.5 ms cannot be set (it reads as
0). The filters, client side first: delay (once per request), optionally blocksize (--maxdata:
each request cut into pieces that pass the rate filter one after another), rate. The bucket
(--burstiness × the rate) must hold a whole request (or a --maxdata piece): for a request
larger than its bucket nbdkit's rate filter sleeps for all the bits it lacks, but on waking
banks at most a bucketful and sleeps again for the rest, so the link runs slower than its rate
and the model (a token bucket that keeps its credit) does not apply (see docs/EXPLORATION.md,
question 5: --burstiness 0.01 --maxdata 0 shows it). Each copy moves about --seconds of the link's bandwidth. Sockets live in a private
temporary directory (no TCP port is used). Needs nbdkit with its rate and delay filters and
the memory and pattern plugins; skips with a printed reason without them.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="rounds of real copies per combination")
    p.add_argument("--seconds", type=float, default=2.5, help="each copy's length in seconds of the link")
    p.add_argument("--burstiness", type=float, default=0.025,
                   help="nbdkit rate filter's bucket, in seconds of the rate (at 50 MB/s: 1.25 MB)")
    p.add_argument("--maxdata", type=int, default=0,
                   help="nbdkit blocksize filter's maxdata in front of the rate filter (0: none)")
    p.add_argument("--combos", default="50:1,50:5,200:1,200:5,50:5:source")
    p.add_argument("--configs", default="1Mx1x1,1Mx4x1,1Mx16x1,256Kx4x1")
    p.add_argument("--kcopyd", default="target/release/kcopyd")
    p.add_argument("--json", help="also write every row as JSON here")
    return p.parse_args()


def skip(reason):
    print(f"netmodel bench skipped: {reason}")
    sys.exit(0)


def wait_for(pidfile, process, timeout=30.0):
    """Until nbdkit has written `pidfile`: it does so once its socket listens (probing the
    socket with a connection would make it log a broken handshake)."""
    deadline = time.monotonic() + timeout
    while not (os.path.exists(pidfile) and os.path.getsize(pidfile) > 0):
        if process.poll() is not None:
            raise RuntimeError(f"nbdkit for {pidfile} exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nbdkit wrote no {pidfile} after {timeout} s")
        time.sleep(0.005)


class Export:
    """An nbdkit export on a unix socket in `work`, stopped on exit."""

    def __init__(self, work, name, plugin_args, filters=()):
        self.sock = os.path.join(work, f"{name}.sock")
        pidfile = os.path.join(work, f"{name}.pid")
        if os.path.exists(pidfile):
            os.unlink(pidfile)
        command = ["nbdkit", "--foreground", "--exit-with-parent", "--unix", self.sock, "--pidfile", pidfile]
        command += [f"--filter={f}" for f in filters] + plugin_args
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_for(pidfile, self.process)
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait()
        if os.path.exists(self.sock):
            os.unlink(self.sock)


def validate_link(args, source, target, extra):
    command = [args.kcopyd, "sim", "validate-link", source, target, "--json", "--quiet"] + extra
    done = subprocess.run(command, stdout=subprocess.PIPE, check=True, text=True)
    return json.loads(done.stdout), command


def size_of(text):
    """Bytes of a size as the configurations write it: 256K, 1M, 4096."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def fit_line(points):
    """Least-squares (intercept, slope) of (x, y) points."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y - slope * mean_x, slope


def local_model(args, work, size_bytes):
    """The disk model of the exports without filters: per sub-job, fixed cost + cost per byte."""
    configs = "64Kx1x1,256Kx1x1,1Mx1x1"
    with Export(work, "calibrate-source", ["pattern", str(size_bytes)]) as source, \
            Export(work, "calibrate-target", ["memory", str(size_bytes)]) as target:
        result, _ = validate_link(args, source.uri, target.uri,
                                  ["--link-rtt", "0us", "--link-bandwidth", "0", "--configs", configs,
                                   "--runs", str(args.runs)])
    points = []
    for row in result["configs"]:
        sub_jobs = result["len_bytes"] / row["subjob_size_bytes"]
        points.append((row["subjob_size_bytes"], row["measured_median_seconds"] / sub_jobs))
    cost_s, per_byte_s = fit_line(points)
    cost_us = max(0, round(cost_s * 1e6))
    # One sub-job reads once and writes once: each pays half of the fixed cost, and the bytes
    # cross one shared path twice.
    bandwidth = round(2 / per_byte_s) if per_byte_s > 0 else 0
    print(f"exports without filters: per sub-job {cost_us} µs + "
          f"{per_byte_s * 1e9 * (1 << 20) / 1e6:.3f} ms per MiB "
          f"({', '.join(f'{x >> 10} KiB: {y * 1e3:.3f} ms' for x, y in points)})", flush=True)
    model = (f'description = "nbdkit memory and pattern exports on unix sockets, no filters, '
             f'fitted by bench/netmodel.py"\none_device = true\n'
             f"[latency.read]\ncost_us = {cost_us // 2}\nbandwidth_bytes_per_s = {bandwidth}\n"
             f"[latency.write]\ncost_us = {cost_us - cost_us // 2}\nbandwidth_bytes_per_s = {bandwidth}\n"
             f"[latency.path]\nshared = true\n")
    path = os.path.join(work, "exports.toml")
    with open(path, "w") as f:
        f.write(model)
    return path, model


def combination(args, work, model_path, combo):
    parts = combo.split(":")
    mb_per_s, rtt_ms = float(parts[0]), int(parts[1])
    remote = parts[2] if len(parts) > 2 else "target"
    bandwidth = int(mb_per_s * 1e6)
    size_bytes = int(bandwidth * args.seconds) // (1 << 20) * (1 << 20)
    burst = int(bandwidth * args.burstiness)
    # The delay once per request, then (with --maxdata) the request cut into pieces no larger
    # than the rate filter's bucket, each through the bucket.
    filters = ["delay", "blocksize", "rate"] if args.maxdata else ["delay", "rate"]
    link_args = [f"rate={bandwidth * 8}", f"burstiness={args.burstiness}",
                 f"delay-read={rtt_ms}ms", f"delay-write={rtt_ms}ms"]
    if args.maxdata:
        link_args.append(f"maxdata={args.maxdata}")
    largest = args.maxdata or max(size_of(c.split("x")[0]) for c in args.configs.split(","))
    if largest > burst:
        print(f"warning: requests of {largest} bytes are larger than the {burst}-byte bucket of {combo}: "
              "nbdkit's rate filter loses tokens on them, the link runs slower than modelled", flush=True)
    if remote == "source":
        source = Export(work, "source", ["pattern", str(size_bytes)] + link_args, filters)
        target = Export(work, "target", ["memory", str(size_bytes)])
    else:
        source = Export(work, "source", ["pattern", str(size_bytes)])
        target = Export(work, "target", ["memory", str(size_bytes)] + link_args, filters)
    with source, target:
        result, command = validate_link(args, source.uri, target.uri,
                                        ["--link-rtt", f"{rtt_ms}ms", "--link-bandwidth", str(bandwidth),
                                         "--link-burst", str(burst), "--remote", remote, "--model", model_path,
                                         "--configs", args.configs, "--runs", str(args.runs)])
    shown = " ".join(command[3:]).replace(work, "$WORK")
    return [(mb_per_s, rtt_ms, remote, size_bytes, row) for row in result["configs"]], shown


def main():
    args = parse_args()
    if shutil.which("nbdkit") is None:
        skip("nbdkit is not installed")
    if not os.path.exists(args.kcopyd):
        skip(f"{args.kcopyd} is not built (cargo build --release -p kcopyd-cli)")
    for part in (["--filter=rate", "--filter=delay", "memory", "1M"], ["pattern", "1M"]):
        if subprocess.run(["nbdkit", "--dump-plugin"] + part, capture_output=True).returncode != 0:
            skip(f"nbdkit cannot load {' '.join(part)}")
    print(f"load average before: {os.getloadavg()[0]:.2f} (on {os.cpu_count()} CPUs)", flush=True)
    rows = []
    models = []
    with tempfile.TemporaryDirectory(prefix="kcopyd-netmodel.") as work:
        for combo in args.combos.split(","):
            # The exports' own cost depends on how busy the CPUs are: measured again just
            # before each combination.
            model_path, model = local_model(args, work, 128 << 20)
            models.append(model)
            got, shown = combination(args, work, model_path, combo)
            print(f"$ kcopyd sim validate-link {shown}", flush=True)
            for mb_per_s, rtt_ms, remote, size_bytes, row in got:
                rows.append((mb_per_s, rtt_ms, remote, size_bytes, row))
                print(table_line(mb_per_s, rtt_ms, remote, size_bytes, row), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("\n| link MB/s | round trip | remote | copy | sub-job × in flight | predicted s | measured s "
          "(median, fastest) | error |")
    print("|---|---|---|---|---|---|---|---|")
    for mb_per_s, rtt_ms, remote, size_bytes, row in rows:
        print(f"| {mb_per_s:g} | {rtt_ms} ms | {remote} | {size_bytes >> 20} MiB | "
              f"{row['subjob_size_bytes'] >> 10} KiB × {row['subjobs_in_flight']} | {row['predicted_seconds']:.3f} | "
              f"{row['measured_median_seconds']:.3f} ({row['measured_min_seconds']:.3f}) | "
              f"{row['error_percent']:+.1f} % |")
    worst = max(abs(r[4]["error_percent"]) for r in rows)
    print(f"\nlargest error: {worst:.1f} % over {len(rows)} rows (median of {args.runs} runs each)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"models": models, "rows": [
                {"mb_per_s": m, "rtt_ms": t, "remote": r, "len_bytes": s, **row} for m, t, r, s, row in rows
            ]}, f, indent=1)


def table_line(mb_per_s, rtt_ms, remote, size_bytes, row):
    return (f"  {mb_per_s:>5g} MB/s {rtt_ms:>2} ms {remote:<6} {size_bytes >> 20:>4} MiB "
            f"{row['subjob_size_bytes'] >> 10:>5} KiB × {row['subjobs_in_flight']:<3} "
            f"predicted {row['predicted_seconds']:7.3f} s  measured {row['measured_median_seconds']:7.3f} s "
            f"(fastest {row['measured_min_seconds']:.3f})  error {row['error_percent']:+6.1f} %")


if __name__ == "__main__":
    main()
