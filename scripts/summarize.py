"""Print a table of pytest-benchmark JSON files written by the HiFuse benchmarks (an op's GB/s
against the bytes its launches move and against the least it must move, each with its share
of the same run's copy bandwidth, and moved over least); with --bytes, each op's launches and
bytes instead (of --count-only runs too: ``benchmarks/byte_model.py``); with
--targets, the performance targets with the latest figure measured for each, and with
--chart, a bar chart of the whole model per setting (eager, the compiled peer, fused). JUnit XML
of the test runs (``pytest --junitxml``, suite named after the device) and the memcheck log of
``scripts/gpu_check.sh`` given among the files fill the targets' test rows."""

from __future__ import annotations

import argparse
import json
import re
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path

FUSED_PROVIDERS = ("fused", "fused_compile", "fused_cudagraphs", "fused_graph")
# whole model, bf16: (mode, batch, goal as a fraction of the compiled peer's time, the H200 goal)
MODEL_TARGETS = [
    ("train", 128, 32 / 68.6, "32 ms (peer 68.6)"),
    ("infer", 128, 11 / 22.9, "11 ms (peer 22.9)"),
    ("train", 32, 0.5, "17.5 ms (peer 35.0)"),
    ("infer", 32, 0.5, "3.9 ms (peer 7.9)"),
]
PEAK_GOAL_GIB = 10
# forward+backward at batch 128, bf16: (what, test, fused impl, the cases summed, eager and goal ms on an H200)
BLOCK_TARGETS = [
    ("8 global blocks", "test_global_blocks_tiny", "fused", None, 37.3, 10),
    ("8 local blocks", "test_local_blocks_tiny", "fused", None, 22.4, 6),
    ("stems and downsamples", "test_stem_layer", "fused",
     ("local_stem", "local_down1", "local_down2", "local_down3"), 12.2, 4),
    ("patch merging", "test_patch_merge_norm", "native", ("merge1", "merge2", "merge3"), 4.8, 1.5),
    ("patch embedding", "test_stem_layer", "fused", ("patch_embed",), 3.9, 1.5),
    ("4 fusion blocks", "test_fusion_blocks_tiny", "fused", None, 97.3, 25),
]
ATTENTION_STAGES = ("stage1", "stage2", "stage3", "stage4")
# memory-bound ops held to 75% of the copy bandwidth: test -> the fused impl's name
MEMORY_BOUND = {
    "test_layer_norm_cf": "native", "test_layer_norm_cat": "fused", "test_gated_layer_norm": "fused",
    "test_gate_pooling": "fused", "test_batch_norm_act": "fused", "test_dwconv_layer_norm": "fused",
    "test_gelu_residual": "fused", "test_residual_layer_norm": "fused",
}
COPY_GOAL = 0.75


def copy_bandwidth(records) -> dict[str, float]:
    """Best device-to-device copy GB/s per device (benchmarks/test_copy.py) among these records."""
    best: dict[str, float] = {}
    for r in records:
        if r["info"].get("impl") == "copy":
            best[r["device"]] = max(best.get(r["device"], 0.0), r["info"]["gb_per_s"])
    return best


def _what(r) -> str:
    """A benchmark's name: the test without ``test_`` and its parameters but the impl."""
    info = r["info"]
    if "mode" in info:
        what = f"{info['mode']} {info['variant']} b{info['batch']} {info['dtype']} {info['memory_format']}"
        return what + (f" {info['rebuilds']}" if "rebuilds" in info else "")
    params = {k: v for k, v in r["params"].items() if k != "impl"}
    if "shape" in info:  # after the case's name where the shape is its parameter (two norms share one)
        params["shape"] = " ".join(map(str, [params.get("shape", ""), tuple(info["shape"])])).strip()
    return " ".join([r["test"].removeprefix("test_"), *map(str, params.values())])


def bandwidth(r, copy: dict[str, float]) -> dict:
    """An op benchmark's figures: GB/s against the bytes it moves and against the least it
    must move (``gb_per_s``; older runs have it alone, against a hand count of the least), each
    with its share of the device's copy bandwidth, and moved over least."""
    info, out = r["info"], {}
    gbs = {"min": info.get("gb_per_s")}
    if "bytes_moved" in info:
        out["ratio"] = info["bytes_moved"] / info["bytes_min"]
        if r["ms"]:
            gbs["moved"] = info["bytes_moved"] / r["ms"] / 1e6
    reference = copy.get(r["device"]) if info.get("impl") != "copy" else None
    for key, value in gbs.items():
        if value is not None:
            out[f"{key} GB/s"] = f"{value:.0f}" + (f" ({100 * value / reference:.0f}% of copy)" if reference else "")
    return out


def rows(records, copy: dict[str, float]):
    """The main table's rows: benchmark, impl, median ms, GB/s against the bytes moved and the
    least, moved/least, throughput, peak MiB, device."""
    for r in records:
        info = r["info"]
        if "mode" in info:
            figure = f"{info['images_per_s']:.0f} img/s, {info['tflops_per_s']:.1f} TFLOP/s"
            impl = info["provider"]
        else:
            figure = f"{info['tflops_per_s']:.1f} TFLOP/s" if "tflops_per_s" in info else ""
            impl = info.get("impl", "")
        b = bandwidth(r, copy)
        ratio = f"{b['ratio']:.2f}" if "ratio" in b else ""
        ms = "counted, not timed" if r["ms"] is None else f"{r['ms']:.3f}"
        mem = info.get("peak_mem_mib")
        yield (_what(r), impl, ms, b.get("moved GB/s", ""), b.get("min GB/s", ""), ratio, figure,
               f"{mem:.0f}" if mem else "", r["device"])


def byte_rows(records) -> list[str]:
    """Each op benchmark's launches and bytes, moved and least, forward beside forward and
    backward, as markdown table lines (counted or timed records alike; the latest of each).
    The backward alone is forward and backward less the forward: what it moved, against its
    own least, the forward's reads read again (``bytes_read_min``), the outputs' gradients read
    and the inputs' written; a record without ``bytes_read_min`` (before it was kept) leaves
    it blank."""
    cases: dict[tuple, dict] = {}
    for r in sorted(records, key=lambda r: r["when"]):
        if "bytes_moved" in r["info"]:
            key = (_what({**r, "params": {k: v for k, v in r["params"].items() if k != "direction"}}),
                   r["info"].get("impl", ""))
            cases.setdefault(key, {})[r["info"]["direction"]] = r["info"]
    lines = ["| benchmark | impl | fwd launches | fwd MB moved | fwd MB min | fwd moved/min | fwd+bwd launches | "
             "fwd+bwd MB moved | fwd+bwd MB min | fwd+bwd moved/min | bwd MB moved | bwd MB min | bwd moved/min |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (what, impl), found in sorted(cases.items()):
        cells = []
        for direction in ("fwd", "fwd_bwd"):
            i = found.get(direction)
            cells += ([str(i["launches"]), f"{i['bytes_moved'] / 1e6:.1f}", f"{i['bytes_min'] / 1e6:.1f}",
                       f"{i['bytes_moved'] / i['bytes_min']:.2f}"] if i else ["", "", "", ""])
        fwd, both = found.get("fwd"), found.get("fwd_bwd")
        if fwd and both and "bytes_read_min" in both:
            moved = both["bytes_moved"] - fwd["bytes_moved"]
            least = both["bytes_min"] - fwd["bytes_min"] + both["bytes_read_min"]
            cells += [f"{moved / 1e6:.1f}", f"{least / 1e6:.1f}", f"{moved / least:.2f}"]
        else:
            cells += ["", "", ""]
        lines.append(f"| {what} | {impl} | " + " | ".join(cells) + " |")
    return lines


def tile_rows(records) -> list[str]:
    """The GEMM kernels' tile traffic (``tile_bytes``: bytes their programs move between L2
    and the SMs) of each op benchmark that records it, beside what the byte model counts them
    to move, as markdown table lines (the latest of each)."""
    cases: dict[tuple, dict] = {}
    for r in sorted(records, key=lambda r: r["when"]):
        for kernel, tile in r["info"].get("tile_bytes", {}).items():
            moved = r["info"]["moved_by"][kernel][1]
            what = _what({**r, "params": {k: v for k, v in r["params"].items() if k != "direction"}})
            cases[what, r["info"]["direction"], kernel] = (tile, moved)
    if not cases:
        return []
    lines = ["| benchmark | direction | kernel | MB through L2 | MB moved | L2 / moved |", "|---|---|---|---|---|---|"]
    for (what, direction, kernel), (tile, moved) in sorted(cases.items()):
        lines.append(f"| {what} | {direction} | {kernel} | {tile / 1e6:.1f} | {moved / 1e6:.1f} | {tile / moved:.2f} |")
    return lines


def load(paths) -> list[dict]:
    """Every benchmark of these files: test, case (the parameters), params, info, ms (None for
    one counted, not timed: ``--count-only``), date, device."""
    records = []
    for path in paths:
        data = json.loads(path.read_text())
        when = data.get("datetime", "")
        device = data.get("machine_info", {}).get("hifuse", {}).get("device", "?")
        for bench in data.get("benchmarks", []):
            test, _, case = bench["name"].partition("[")
            info = bench.get("extra_info", {})
            ms = None if info.get("counted_only") else bench["stats"]["median"] * 1e3
            records.append(dict(test=test, case=case.rstrip("]"), params=bench.get("params") or {}, info=info, ms=ms,
                                when=when, date=when[:10], device=device))
    return records


def load_tests(paths) -> list[dict]:
    """Every test case of the JUnit XML files: file (stem), name, state, date, device (suite name)."""
    cases = []
    for path in paths:
        if path.suffix != ".xml" or not path.exists():
            continue
        for suite in ET.parse(path).getroot().iter("testsuite"):
            for case in suite.iter("testcase"):
                state = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
                cases.append(dict(file=path.stem, name=f"{case.get('classname')}::{case.get('name')}", state=state,
                                  date=suite.get("timestamp", "")[:10], device=suite.get("name")))
    return cases


def load_memcheck(paths) -> list[dict]:
    """gpu_check.sh's memcheck logs: device, errors compute-sanitizer reported, exit status."""
    runs = []
    for path in paths:
        if path.suffix != ".log" or not path.exists():
            continue
        text = path.read_text(errors="replace")
        device, errors, exit_ = (re.search(pattern, text, re.MULTILINE) for pattern in
                                 (r"^device: (.*)$", r"ERROR SUMMARY: (\d+) error", r"^exit (\d+)$"))
        if device:
            runs.append(dict(device=device.group(1).strip(), errors=int(errors.group(1)) if errors else None,
                             exit=int(exit_.group(1)) if exit_ else None))
    return runs


def _counts(cases) -> str:
    states = [c["state"] for c in cases]
    if not states:
        return "none recorded"
    return ", ".join(f"{states.count(s)} {s}" for s in ("passed", "failure", "error", "skipped") if s in states)


def numbers_rows(cases, memcheck) -> list[str]:
    """The numbers targets: every test passes, deterministic backwards, past 2^31, memcheck."""
    ran = [c for c in cases if c["file"].startswith("tests")]  # the memcheck run is apart
    groups = [
        ("every test passes on the device", "no failure or error", ran),
        ("fused backwards bitwise equal in two runs", "all pass", [c for c in ran if "determinis" in c["name"]]),
        ("one call per kernel family past 2^31 elements", "all pass", [c for c in ran if "past_2_31" in c["name"]]),
    ]
    lines = []
    for what, goal, found in groups:
        if not found:
            lines.append(f"| {what} | {goal} | not run | | | |")
            continue
        bad = [c["name"] for c in found if c["state"] in ("failure", "error")]
        status = "met" if not bad else "failing: " + ", ".join(bad[:4]) + (" ..." if len(bad) > 4 else "")
        lines.append(f"| {what} | {goal} | {_counts(found)} | | {max(c['date'] for c in found)} | {status} |")
    checked = [c for c in cases if c["file"] == "memcheck"]
    if not memcheck:
        lines.append("| compute-sanitizer memcheck of the fused ops | no error | not run | | | |")
    else:
        run = memcheck[-1]
        errors = "no error summary" if run["errors"] is None else f"{run['errors']} errors"
        status = "met" if run["errors"] == 0 and run["exit"] == 0 and checked else f"exit {run['exit']}"
        date = max((c["date"] for c in checked), default="")
        lines.append(f"| compute-sanitizer memcheck of the fused ops | no error | {errors}; tests: {_counts(checked)} | "
                     f"| {date} | {status} |")
    return lines


def latest(records, test: str, **match):
    """The most recent record of this test whose extra_info has these values, or None."""
    found = [r for r in records if r["test"] == test and all(r["info"].get(k) == v for k, v in match.items())]
    return max(found, key=lambda r: r["when"], default=None)


def _model(records, mode, batch, provider, memory_format=None):
    test = "test_train_step" if mode == "train" else "test_inference"
    match = dict(batch=batch, dtype="bf16", provider=provider)
    if memory_format is None:  # the faster memory format of each one's latest run
        runs = [latest(records, test, **match, memory_format=f) for f in ("contiguous", "channels_last")]
        return min((r for r in runs if r), key=lambda r: r["ms"], default=None)
    return latest(records, test, **match, memory_format=memory_format)


def _fastest_fused(records, mode, batch):
    runs = [_model(records, mode, batch, p) for p in FUSED_PROVIDERS]
    return min((r for r in runs if r), key=lambda r: r["ms"], default=None)


def _setting(r) -> str:
    return f"{r['info']['provider']}, {r['info']['memory_format']}"


def _verdict(value, goal, milestone=None) -> str:
    if value <= goal:
        return "met"
    if milestone is not None and value <= milestone:
        return f"peer beaten; {value / goal:.2f}x the goal"
    return f"{value / goal:.2f}x the goal"


def _sum_cases(records, test, impl, cases):
    """(total ms, latest date) of the fwd_bwd bf16 runs of these cases, or None if one is missing."""
    key = {"test_stem_layer": "layer", "test_patch_merge_norm": "merge"}.get(test)
    runs = [latest(records, test, impl=impl, direction="fwd_bwd", dtype="bf16", **({key: c} if key else {}))
            for c in (cases or [None])]
    if not all(runs):
        return None
    return sum(r["ms"] for r in runs), max(r["date"] for r in runs)


def targets(records, tests=(), memcheck=()) -> str:
    """The targets as a markdown table, each with its latest figure, its date and how far off it is."""
    lines = ["| target | goal | measured | reference in the same files | date | status |", "|---|---|---|---|---|---|"]
    for mode, batch, fraction, goal in MODEL_TARGETS:
        what = f"{'training step' if mode == 'train' else 'inference'}, batch {batch}"
        fused, peer = _fastest_fused(records, mode, batch), _model(records, mode, batch, "compile", "channels_last")
        eager = _model(records, mode, batch, "eager", "contiguous")
        ref = ", ".join(f"{n} {r['ms']:.1f} ms" for n, r in (("compile + channels_last", peer), ("eager", eager)) if r)
        if fused is None:
            lines.append(f"| {what} | {goal} | not measured | {ref} | | |")
            continue
        status = _verdict(fused["ms"], fraction * peer["ms"], peer["ms"]) if peer else "no peer figure"
        lines.append(f"| {what} | {goal} | {fused['ms']:.1f} ms ({_setting(fused)}) | {ref} | {fused['date']} | {status} |")
        if (mode, batch) == ("train", 128):
            peak = fused["info"].get("peak_mem_mib")
            figure = f"{peak / 1024:.1f} GiB ({_setting(fused)})" if peak else "not measured"
            status = _verdict(peak / 1024, PEAK_GOAL_GIB) if peak else ""
            peer_peak = f"compile + channels_last {peer['info']['peak_mem_mib'] / 1024:.1f} GiB" if peer else ""
            lines.append(f"| peak memory, training step, batch 128 | {PEAK_GOAL_GIB} GiB | {figure} | {peer_peak} | "
                         f"{fused['date']} | {status} |")
    for what, test, impl, cases, eager_h200, goal_ms in BLOCK_TARGETS:
        goal = f"{goal_ms} ms (eager {eager_h200})"
        fused, eager = _sum_cases(records, test, impl, cases), _sum_cases(records, test, "eager", cases)
        ref = f"eager {eager[0]:.1f} ms" if eager else ""
        if fused is None:
            lines.append(f"| {what}, fwd+bwd | {goal} | not measured | {ref} | | |")
            continue
        status = _verdict(fused[0], goal_ms / eager_h200 * eager[0]) if eager else "no eager figure"
        lines.append(f"| {what}, fwd+bwd | {goal} | {fused[0]:.2f} ms | {ref} | {fused[1]} | {status} |")
    for stage in ATTENTION_STAGES:
        fused, flex = (latest(records, "test_window_attention", stage=stage, impl=i, direction="fwd_bwd", dtype="bf16")
                       for i in ("fused", "flex"))
        ref = f"FlexAttention {flex['ms']:.2f} ms" if flex else ""
        if fused is None:
            lines.append(f"| window attention {stage}, fwd+bwd | half of FlexAttention | not measured | {ref} | | |")
            continue
        status = _verdict(fused["ms"], flex["ms"] / 2) if flex else "no FlexAttention figure"
        lines.append(f"| window attention {stage}, fwd+bwd | half of FlexAttention | {fused['ms']:.2f} ms | {ref} | "
                     f"{fused['date']} | {status} |")
    copy = copy_bandwidth(records)
    for test, impl in MEMORY_BOUND.items():
        runs = [r for r in records if r["test"] == test and r["info"].get("impl") == impl
                and r["info"].get("dtype") == "bf16" and r["device"] in copy and "gb_per_s" in r["info"]]
        what = test.removeprefix("test_")
        if not runs:
            lines.append(f"| {what} | {COPY_GOAL:.0%} of copy | not measured | | | |")
            continue
        runs.sort(key=lambda r: r["when"])  # the latest run of each case wins
        shares = {r["case"]: r["info"]["gb_per_s"] / copy[r["device"]] for r in runs}
        worst = min(shares, key=shares.get)
        figure = f"lowest {shares[worst]:.0%} ({worst}), median {statistics.median(shares.values()):.0%}"
        status = "met" if shares[worst] >= COPY_GOAL else f"{sum(s < COPY_GOAL for s in shares.values())} of {len(shares)} cases under"
        lines.append(f"| {what} | {COPY_GOAL:.0%} of copy | {figure} | copy {copy[runs[0]['device']]:.0f} GB/s | "
                     f"{max(r['date'] for r in runs)} | {status} |")
    lines += rebuild_rows(records)
    lines += numbers_rows(list(tests), list(memcheck))
    return "\n".join(lines) + "\n"


def rebuild_rows(records) -> list[str]:
    """Each rebuild setting's fused training step at batch 128 (bf16) against rebuilding
    everything: a rebuild pays for itself where keeping its tensor is slower or does not fit."""
    test, match = "test_train_step_rebuilds", dict(batch=128, dtype="bf16")
    names = dict.fromkeys(r["info"]["rebuilds"] for r in records if r["test"] == test)
    runs = {name: latest(records, test, **match, rebuilds=name) for name in names}
    runs = {name: r for name, r in runs.items() if r}
    base = runs.pop("rebuild_all", None)
    if base is None:
        return ["| rebuilds in backward, training step, batch 128 | each pays for itself | not measured | | | |"]
    peak = base["info"].get("peak_mem_mib", 0) / 1024
    lines = [f"| training step, batch 128, rebuilding all | {PEAK_GOAL_GIB} GiB | {base['ms']:.1f} ms, {peak:.1f} GiB | "
             f"| {base['date']} | {_verdict(peak, PEAK_GOAL_GIB)} |"]
    for name, r in runs.items():
        mem = r["info"].get("peak_mem_mib", 0) / 1024
        saved = base["ms"] - r["ms"]
        status = ("rebuild pays (keeping is slower)" if saved <= 0 else
                  "rebuild pays (keeping does not fit)" if mem > PEAK_GOAL_GIB else f"keeping saves {saved:.1f} ms")
        lines.append(f"| training step, batch 128, {name} | faster within {PEAK_GOAL_GIB} GiB | {r['ms']:.1f} ms, "
                     f"{mem:.1f} GiB | rebuilding all {base['ms']:.1f} ms | {r['date']} | {status} |")
    return lines


# colours follow this order; the whole-step CUDA graphs came last
MODEL_PROVIDERS = ("eager", "compile", "fused", "fused_compile", "fused_cudagraphs", "eager_graph", "fused_graph")


def model_bars(records) -> list[dict]:
    """The whole-model chart's panels (bf16), one per (mode, batch): title, mode, batch, and its
    bars, one per provider measured (eager, the compiled peer, each fused provider) at that
    provider's faster memory format: provider, setting, ms, date, device, colour (C0.. by
    provider, the same in every panel)."""
    settings = sorted({(r["info"]["mode"], r["info"]["batch"]) for r in records
                       if "mode" in r["info"] and r["info"].get("dtype") == "bf16"}, key=lambda s: (s[0] != "train", -s[1]))
    panels = []
    for mode, batch in settings:
        bars = []
        for i, provider in enumerate(MODEL_PROVIDERS):
            r = _model(records, mode, batch, provider)
            if r:
                bars.append(dict(provider=provider, setting=_setting(r), ms=r["ms"], date=r["date"], device=r["device"],
                                 colour=f"C{i}"))
        if bars:
            title = f"{'training step' if mode == 'train' else 'inference'}, batch {batch}"
            panels.append(dict(title=title, mode=mode, batch=batch, bars=bars))
    return panels


def chart(records, path: Path):
    """A bar chart of the whole model (bf16): eager, the compiled peer and each fused provider
    at its fastest setting, per (mode, batch) (``model_bars``); returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = model_bars(records)
    if not panels:
        raise SystemExit("no whole-model bf16 benchmark in these files")
    width = max(len(p["bars"]) for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(3.4, 0.95 * width + 0.8) * len(panels), 4.0), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        bars = panel["bars"]
        ax.bar(range(len(bars)), [b["ms"] for b in bars], color=[b["colour"] for b in bars])
        for i, b in enumerate(bars):
            ax.annotate(f"{b['ms']:.1f} ms", (i, b["ms"]), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(bars)), [b["setting"].replace(", ", ",\n") for b in bars], fontsize=7)
        ax.set_ylim(0, 1.12 * max(b["ms"] for b in bars))  # room for the figures above the bars
        ax.set_title(panel["title"], fontsize=9)
        ax.set_ylabel("ms (median)")
    found = [b for p in panels for b in p["bars"]]
    devices = ", ".join(sorted({b["device"] for b in found}))
    dates = ", ".join(sorted({b["date"] for b in found}))
    fig.suptitle(f"HiFuse-Tiny, 224x224, bf16 autocast, {devices} (runs of {dates}); "
                 "each provider at its faster memory format", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    parser.add_argument("--targets", type=Path, help="write the targets table with the latest figures here")
    parser.add_argument("--chart", type=Path, help="write the whole-model bar chart here (PNG; needs matplotlib)")
    parser.add_argument("--device", help="--targets and --chart use this device's figures only "
                        "(default: the device of the newest file)")
    parser.add_argument("--bytes", action="store_true", help="the table of each op benchmark's launches and bytes, "
                        "moved against least, forward, with backward and the backward alone, instead (also of "
                        "runs with --count-only)")
    args = parser.parse_args()
    jsons = [f for f in args.files if f.suffix == ".json" and f.exists()]  # a glob that matched nothing stays as typed
    everything = load(jsons)
    if args.targets or args.chart:
        device = args.device or max(everything, key=lambda r: r["when"], default={}).get("device")
        records = [r for r in everything if r["device"] == device and r["ms"] is not None]
        cases = [c for c in load_tests(args.files) if c["device"] == device]
        memcheck = [m for m in load_memcheck(args.files) if m["device"] == device]
        print(f"targets and chart: {device}, {len(records)} benchmarks, {len(cases)} test results")
        if args.targets:
            args.targets.write_text(targets(records, cases, memcheck))
        if args.chart:
            chart(records, args.chart)
    versions = set()
    for path in jsons:
        h = json.loads(path.read_text()).get("machine_info", {}).get("hifuse", {})
        versions.add(f"{h.get('device')}, torch {h.get('torch')}, CUDA {h.get('cuda')}, triton {h.get('triton')}")
    if args.bytes:
        lines = byte_rows(everything)
        tiles = tile_rows(everything)
        if tiles:
            lines += ["", "GEMM kernels' tile traffic (modelled: each tile every time a program loads or stores it):",
                      "", *tiles]
    else:
        columns = ("benchmark", "impl", "median ms", "GB/s moved", "GB/s min", "moved/min", "throughput", "peak MiB",
                   "device")
        lines = [f"| {' | '.join(columns)} |", "|---" * len(columns) + "|"]
        device_copy = copy_bandwidth(everything)
        for path in jsons:
            records = load([path])
            copy = {**device_copy, **copy_bandwidth(records)}  # the same run's copy where it measured one
            lines += [f"| {' | '.join(row)} |" for row in sorted(rows(records, copy))]
    text = "\n".join(["Measured on: " + "; ".join(sorted(versions)), "", *lines]) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
