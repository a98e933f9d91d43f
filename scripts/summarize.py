"""Print a table of pytest-benchmark JSON files written by the HiFuse benchmarks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def copy_bandwidth(paths) -> dict[str, float]:
    """Best device-to-device copy GB/s per device (benchmarks/test_copy.py) in these files."""
    best: dict[str, float] = {}
    for path in paths:
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        for bench in data.get("benchmarks", []):
            info = bench.get("extra_info", {})
            if info.get("impl") == "copy":
                best[info["device"]] = max(best.get(info["device"], 0.0), info["gb_per_s"])
    return best


def rows(path: Path, copy: dict[str, float] | None = None):
    data = json.loads(path.read_text())
    machine = data.get("machine_info", {}).get("hifuse", {})
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        median_ms = bench["stats"]["median"] * 1e3
        if "mode" in info:
            what = f"{info['mode']} {info['variant']} b{info['batch']} {info['dtype']} {info['memory_format']}"
            figure = f"{info['images_per_s']:.0f} img/s, {info['tflops_per_s']:.1f} TFLOP/s"
            impl = info["provider"]
        else:
            what = bench["name"].split("[")[0].removeprefix("test_")
            params = {k: v for k, v in bench.get("params", {}).items() if k != "impl"}
            if "shape" in info:
                params["shape"] = tuple(info["shape"])
            what += " " + " ".join(str(v) for v in params.values())
            parts = []
            if "tflops_per_s" in info:
                parts.append(f"{info['tflops_per_s']:.1f} TFLOP/s")
            if "gb_per_s" in info:
                parts.append(f"{info['gb_per_s']:.0f} GB/s")
                reference = (copy or {}).get(info.get("device"))
                if reference and info.get("impl") != "copy":
                    parts.append(f"{100 * info['gb_per_s'] / reference:.0f}% of copy")
            figure = ", ".join(parts)
            impl = info.get("impl", "")
        mem = info.get("peak_mem_mib")
        yield (what, impl, median_ms, figure, f"{mem:.0f}" if mem else "", machine.get("device", "?"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args()
    lines = ["| benchmark | impl | median ms | throughput | peak MiB | device |", "|---|---|---|---|---|---|"]
    versions = set()
    copy = copy_bandwidth(args.files)
    for path in args.files:
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        h = data.get("machine_info", {}).get("hifuse", {})
        versions.add(f"{h.get('device')}, torch {h.get('torch')}, CUDA {h.get('cuda')}, triton {h.get('triton')}")
        for what, impl, ms, fig, mem, dev in sorted(rows(path, copy)):
            lines.append(f"| {what} | {impl} | {ms:.3f} | {fig} | {mem} | {dev} |")
    text = "\n".join(["Measured on: " + "; ".join(sorted(versions)), "", *lines]) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
