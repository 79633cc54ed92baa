#!/usr/bin/env python3
"""Sweeps kcopyd's sub-job shapes against qemu-img and dd, alternating, on the files that
bench/compare.py created.

Usage: bench/shapes.py [--rounds N] [--targets 1|3] [--dir DIR] [--shapes 1Mx4,2Mx8,...]
"""

import argparse
import os
import statistics
import subprocess
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--targets", type=int, default=1, choices=[1, 3])
    parser.add_argument("--dir", default="/var/tmp/kcopyd-bench")
    parser.add_argument("--kcopyd", default=os.path.abspath("target/release/kcopyd"))
    parser.add_argument("--memory", default="16M")
    parser.add_argument("--shapes", default="1Mx4,1Mx8,2Mx2,2Mx8")
    args = parser.parse_args()
    os.chdir(args.dir)
    targets = [f"target{i}.img" for i in range(args.targets)]
    commands = {}
    for shape in args.shapes.split(","):
        size, count = shape.split("x")
        commands[f"kcopyd {shape}"] = [[args.kcopyd, "copy", "--quiet", "--memory", args.memory, "--subjob-size", size,
                                        "--subjobs-in-flight", count, "source.img"] + targets]
    qemu = "qemu-img convert -n -f raw -O raw -t none -T none -m 16 -W source.img".split()
    commands["qemu-img" + (" x3" if args.targets == 3 else "")] = [qemu + [t] for t in targets]
    if args.targets == 1:
        commands["dd"] = [f"dd if=source.img of={targets[0]} bs=1M iflag=direct oflag=direct status=none conv=notrunc".split()]
    seconds = {name: [] for name in commands}
    for _ in range(args.rounds):
        for name, steps in commands.items():
            start = time.monotonic()
            for step in steps:
                subprocess.run(step, check=True)
            seconds[name].append(time.monotonic() - start)
    reference = statistics.median(seconds[[n for n in commands if n.startswith("qemu-img")][0]])
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:<16} median {median:.3f} s  / qemu-img {median / reference:.2f}   all: "
              + " ".join(f"{v:.2f}" for v in values))


if __name__ == "__main__":
    main()
