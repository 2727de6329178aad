"""The device's copy bandwidth (bytes read + written per second), as the kernel benchmark
measures it (`kernels/timing.copy_bandwidth`): the denominator of every roofline.

    python benchmarks/e2e_bandwidth.py --out-md bandwidth.md --output-json bandwidth.json
"""

from __future__ import annotations

import argparse
import os
import sys

from bench_common import print_table, write_json

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels"))


def measure(num_bytes: int) -> dict:
    """{"device", "bytes", "bytes_per_s"} of an on-device copy of `num_bytes`."""
    from timing import copy_bandwidth, device_name

    return {"device": device_name(), "bytes": num_bytes,
            "bytes_per_s": copy_bandwidth(num_bytes)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bytes", type=int, default=2 << 30, help="size of the copied array")
    p.add_argument("--out-md", default=None)
    p.add_argument("--output-json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = measure(args.bytes)
    table = print_table(["device", "copied MiB", "copy GB/s (read + write)"],
                        [[result["device"], args.bytes / 2**20, result["bytes_per_s"] / 1e9]],
                        markdown=True)
    if args.out_md:
        with open(args.out_md, "w") as f:
            f.write(f"### Copy bandwidth\n\n{table}\n")
    write_json(args.output_json, result)
    return result


if __name__ == "__main__":
    main()
