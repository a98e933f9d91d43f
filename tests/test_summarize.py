"""scripts/summarize.py: the targets table and the bar chart the results README is built from."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "summarize.py"
H200 = "NVIDIA H200"


def _bench(name, ms, **info):
    return {"name": name, "stats": {"median": ms / 1e3}, "extra_info": info, "params": {}}


def _model(mode, batch, fmt, provider, ms, peak_mib=None):
    test = "test_train_step" if mode == "train" else "test_inference"
    info = dict(mode=mode, batch=batch, dtype="bf16", memory_format=fmt, provider=provider, variant="hifuse_tiny",
                images_per_s=batch / ms * 1e3, tflops_per_s=1.0)
    if peak_mib:
        info["peak_mem_mib"] = peak_mib
    return _bench(f"{test}[{batch}-bf16-{fmt}-{provider}]", ms, **info)


def _write(path, when, device, benches):
    path.write_text(json.dumps({"datetime": when, "machine_info": {"hifuse": {"device": device}},
                                "benchmarks": benches}))
    return path


def _run(*args):
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def files(tmp_path):
    old = _write(tmp_path / "old.json", "2026-11-26T05:00:00", H200, [
        _model("train", 128, "contiguous", "eager", 167.3),
        _model("train", 128, "channels_last", "compile", 68.6, peak_mib=15302),
        _model("train", 128, "channels_last", "fused", 118.1, peak_mib=16488),
        _bench("test_global_blocks_tiny[fused-fwd_bwd]", 20.0, impl="fused", direction="fwd_bwd", dtype="bf16"),
    ])
    new = _write(tmp_path / "new.json", "2026-12-10T05:00:00", H200, [
        _model("train", 128, "channels_last", "fused", 60.0, peak_mib=9 * 1024),
        _model("train", 128, "channels_last", "fused_cudagraphs", 40.0, peak_mib=9.5 * 1024),
        _bench("test_global_blocks_tiny[eager-fwd_bwd]", 40.0, impl="eager", direction="fwd_bwd", dtype="bf16"),
        _bench("test_window_attention[stage1-flex-fwd_bwd]", 1.6, stage="stage1", impl="flex",
               direction="fwd_bwd", dtype="bf16"),
        _bench("test_window_attention[stage1-fused-fwd_bwd]", 1.0, stage="stage1", impl="fused",
               direction="fwd_bwd", dtype="bf16"),
        _bench("test_copy[256]", 1.0, impl="copy", gb_per_s=1000.0, device=H200),
        *[_bench(f"test_gelu_residual[{s}-fused-fwd]", 1.0, impl="fused", dtype="bf16", gb_per_s=g, device=H200)
          for s, g in (("stage1", 800.0), ("stage2", 700.0), ("stage3", 900.0))],
    ])
    other = _write(tmp_path / "other.json", "2026-12-11T05:00:00", "NVIDIA H100", [
        _model("train", 128, "channels_last", "fused", 1.0),
    ])
    return [old, new, other]


def _rows(table: str) -> dict:
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def test_targets_take_the_latest_figure_of_the_device(files, tmp_path):
    out = tmp_path / "targets.md"
    printed = _run(*files, "--targets", out, "--device", H200)
    assert H200 in printed
    rows = _rows(out.read_text())
    train = rows["training step, batch 128"]
    # the fastest fused provider of the latest runs; the H100 file's 1 ms is another device's
    assert train[2] == "40.0 ms (fused_cudagraphs, channels_last)"
    assert "compile + channels_last 68.6 ms" in train[3] and "eager 167.3 ms" in train[3]
    assert train[4] == "2026-12-10"
    assert train[5] == f"peer beaten; {40.0 / 32:.2f}x the goal"
    assert rows["peak memory, training step, batch 128"][2].startswith("9.5 GiB") \
        and rows["peak memory, training step, batch 128"][5] == "met"
    assert rows["inference, batch 128"][2] == "not measured"
    # blocks: held to the goal's ratio to eager, eager from the same files
    glob = rows["8 global blocks, fwd+bwd"]
    assert glob[2] == "20.00 ms" and glob[3] == "eager 40.0 ms"
    assert glob[5] == f"{20.0 / (10 / 37.3 * 40.0):.2f}x the goal"
    assert rows["window attention stage1, fwd+bwd"][5] == f"{1.0 / 0.8:.2f}x the goal"
    assert rows["window attention stage2, fwd+bwd"][2] == "not measured"
    gelu = rows["gelu_residual"]
    assert gelu[2] == "lowest 70% (stage2-fused-fwd), median 80%" and gelu[5] == "1 of 3 cases under"
    assert rows["layer_norm_cf"][2] == "not measured"


def test_rebuild_rows_weigh_time_against_memory(files, tmp_path):
    def rebuilds(name, ms, peak_gib):
        return _bench(f"test_train_step_rebuilds[128-bf16-channels_last-{name}]", ms, mode="train", batch=128,
                      dtype="bf16", memory_format="channels_last", provider="fused", variant="hifuse_tiny",
                      images_per_s=1.0, tflops_per_s=1.0, peak_mem_mib=peak_gib * 1024, rebuilds=name)

    run = _write(tmp_path / "rebuilds.json", "2026-12-12T05:00:00", H200, [
        rebuilds("rebuild_all", 50.0, 6.0), rebuilds("keep_irmlp", 47.5, 8.0), rebuilds("keep_all", 45.0, 11.0),
        rebuilds("keep_norm3", 51.0, 7.0),
    ])
    out = tmp_path / "targets.md"
    _run(*files, run, "--targets", out, "--device", H200)
    rows = _rows(out.read_text())
    assert rows["training step, batch 128, rebuilding all"][2:] == ["50.0 ms, 6.0 GiB", "", "2026-12-12", "met"]
    assert rows["training step, batch 128, keep_irmlp"][5] == "keeping saves 2.5 ms"
    assert rows["training step, batch 128, keep_all"][5] == "rebuild pays (keeping does not fit)"
    assert rows["training step, batch 128, keep_norm3"][5] == "rebuild pays (keeping is slower)"
    _run(*files[:2], "--targets", out, "--device", H200)
    assert _rows(out.read_text())["rebuilds in backward, training step, batch 128"][2] == "not measured"


def test_device_defaults_to_the_newest_file(files, tmp_path):
    out = tmp_path / "targets.md"
    assert "NVIDIA H100" in _run(*files, "--targets", out)
    assert _rows(out.read_text())["training step, batch 128"][2] == "1.0 ms (fused, channels_last)"


def test_chart_is_written(files, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "model.png"
    _run(*files, "--chart", out, "--device", H200)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _summarize():
    spec = importlib.util.spec_from_file_location("summarize", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chart_draws_each_providers_fastest_setting(files, tmp_path):
    summarize = _summarize()
    # in the newest run the fused model is faster NCHW (contiguous) than channels-last, and eager
    # faster channels-last
    nchw = _write(tmp_path / "nchw.json", "2026-12-10T06:00:00", H200, [
        _model("train", 128, "contiguous", "fused", 50.0),
        _model("train", 128, "channels_last", "eager", 148.4),
        _model("infer", 32, "channels_last", "fused", 9.0),
    ])
    records = [r for r in summarize.load([*files, nchw]) if r["device"] == H200]
    panels = summarize.model_bars(records)
    assert [p["title"] for p in panels] == ["training step, batch 128", "inference, batch 32"]
    train = [(b["setting"], round(b["ms"], 1), b["colour"]) for b in panels[0]["bars"]]
    assert train == [("eager, channels_last", 148.4, "C0"), ("compile, channels_last", 68.6, "C1"),
                     ("fused, contiguous", 50.0, "C2"), ("fused_cudagraphs, channels_last", 40.0, "C4")]
    # a provider keeps its colour where others are missing
    assert [(b["setting"], b["colour"]) for b in panels[1]["bars"]] == [("fused, channels_last", "C2")]

    pytest.importorskip("matplotlib")
    fig = summarize.chart(records, tmp_path / "model.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "eager,\nchannels_last", "compile,\nchannels_last", "fused,\ncontiguous", "fused_cudagraphs,\nchannels_last"]
    assert [t.get_text() for t in ax.texts] == ["148.4 ms", "68.6 ms", "50.0 ms", "40.0 ms"]
    assert [round(p.get_height(), 1) for p in ax.patches] == [148.4, 68.6, 50.0, 40.0]
    # the device once, in the figure's title; not in the panels'
    assert fig._suptitle.get_text().count(H200) == 1
    assert all(H200 not in a.get_title() for a in fig.axes)


def _junit(path, device, cases):
    body = "".join(
        f'<testcase classname="tests.{mod}" name="{name}">' + ({"passed": ""}.get(state, f"<{state} message='x'/>"))
        + "</testcase>" for mod, name, state in cases)
    path.write_text(f'<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="{device}" '
                    f'timestamp="2026-12-10T05:00:00+00:00">{body}</testsuite></testsuites>')
    return path


def test_numbers_rows_come_from_the_test_runs(files, tmp_path):
    tests = _junit(tmp_path / "tests.xml", H200, [
        ("test_window_attention", "test_backward_is_deterministic", "passed"),
        ("test_dwconv_layer_norm", "test_backward_deterministic_and_expanded_gradient", "failure"),
        ("test_large", "test_pools_past_2_31", "passed"),
        ("test_large", "test_window_attention_past_2_31", "skipped"),
        ("test_model", "test_whole_model", "passed"),
    ])
    memcheck = _junit(tmp_path / "memcheck.xml", H200, [("test_gelu_residual", "test_gpu", "passed")])
    other = _junit(tmp_path / "tests_other.xml", "NVIDIA H100", [("test_model", "test_x", "error")])
    log = tmp_path / "memcheck.log"
    log.write_text(f"device: {H200}\n1 passed\n========= ERROR SUMMARY: 0 errors\nexit 0\n")
    out = tmp_path / "targets.md"
    _run(*files, tests, memcheck, other, log, "--targets", out, "--device", H200)
    rows = _rows(out.read_text())
    every = rows["every test passes on the device"]
    assert every[2] == "3 passed, 1 failure, 1 skipped"  # the H100's error is another device's
    assert every[5].startswith("failing: tests.test_dwconv_layer_norm::") and every[4] == "2026-12-10"
    assert rows["fused backwards bitwise equal in two runs"][2] == "1 passed, 1 failure"
    assert rows["one call per kernel family past 2^31 elements"][2] == "1 passed, 1 skipped"
    assert rows["one call per kernel family past 2^31 elements"][5] == "met"
    check = rows["compute-sanitizer memcheck of the fused ops"]
    assert check[2] == "0 errors; tests: 1 passed" and check[5] == "met"

    log.write_text(f"device: {H200}\n========= ERROR SUMMARY: 3 errors\nexit 1\n")
    _run(*files, tests, memcheck, log, "--targets", out, "--device", H200)
    check = _rows(out.read_text())["compute-sanitizer memcheck of the fused ops"]
    assert check[2].startswith("3 errors") and check[5] == "exit 1"


def test_numbers_rows_say_what_did_not_run(files, tmp_path):
    out = tmp_path / "targets.md"
    _run(*files, "--targets", out, "--device", H200)
    rows = _rows(out.read_text())
    assert rows["every test passes on the device"][2] == "not run"
    assert rows["compute-sanitizer memcheck of the fused ops"][2] == "not run"


def _op(test, params, ms, moved, least, launches, counted=False, **extra):
    info = dict(impl=params["impl"], direction=params["direction"], bytes_moved=moved, bytes_min=least,
                launches=launches, device=H200, **extra)
    if counted:
        info["counted_only"] = True
    else:
        info["gb_per_s"] = least / ms / 1e6  # as time_op records it
    bench = _bench(f"{test}[{'-'.join(params.values())}]", ms, **info)
    bench["params"] = params
    return bench


def test_table_gives_bandwidth_against_moved_and_least_bytes(tmp_path):
    run = _write(tmp_path / "run.json", "2026-12-10T05:00:00", H200, [
        _bench("test_copy[256]", 1.0, impl="copy", gb_per_s=4000.0, device=H200),
        # 3 GB moved, 2 GB least, in 1 ms
        _op("test_gelu_residual", dict(direction="fwd", impl="fused", stage="s1"), 1.0, 3e9, 2e9, 1),
    ])
    other = _write(tmp_path / "other.json", "2026-12-11T05:00:00", H200, [
        _bench("test_copy[256]", 1.0, impl="copy", gb_per_s=1000.0, device=H200),
        # a run before byte counts: gb_per_s against a hand count of the least
        _bench("test_layer_norm_cf[stem96]", 1.0, impl="native", gb_per_s=500.0, device=H200,
               direction="fwd", dtype="bf16"),
    ])
    rows = _rows(_run(run, other).split("\n\n", 1)[1])
    gelu = rows["gelu_residual fwd s1"]
    # each run held to its own copy figure, not the device's best
    assert gelu[1:6] == ["fused", "1.000", "3000 (75% of copy)", "2000 (50% of copy)", "1.50"]
    norm = rows["layer_norm_cf"]
    assert norm[3:6] == ["", "500 (50% of copy)", ""]


def test_bytes_table_sets_forward_beside_backward(tmp_path):
    counted = _write(tmp_path / "counted.json", "2026-12-10T05:00:00", "cpu (x86_64)", [
        *[_op("test_gate_pooling", dict(direction=d, impl="fused", which="spatial_pool", stage="fu1"), 9.0, moved,
              least, n, counted=True)
          for d, moved, least, n in (("fwd", 2.0e6, 1.0e6, 1), ("fwd_bwd", 6.0e6, 2.4e6, 2))],
        # a backward that reads its 0.8 MB input again: 3.0 - 1.6 + 0.8 MB at least, 3.6 moved
        *[_op("test_gate_pooling", dict(direction=d, impl="fused", which="spatial_pool", stage="fu2"), 9.0, moved,
              least, n, counted=True, bytes_read_min=0.8e6)
          for d, moved, least, n in (("fwd", 2.0e6, 1.6e6, 1), ("fwd_bwd", 5.6e6, 3.0e6, 2))],
        _op("test_window_attention", dict(direction="fwd_bwd", impl="fused", stage="stage1"), 9.0, 1e6, 1e6, 8,
            counted=True),
        # two norms of one shape stay two rows
        *[_op("test_layer_norm_cf", dict(shape=name, direction="fwd", impl="native"), 9.0, 1e6, 1e6, 1, counted=True,
              shape=[128, 96, 56, 56]) for name in ("stem96", "down96")],
    ])
    rows = _rows(_run(counted, "--bytes").split("\n\n", 1)[1])
    assert rows["gate_pooling spatial_pool fu1"][1:] == ["fused", "1", "2.0", "1.0", "2.00", "2", "6.0", "2.4", "2.50",
                                                         "", "", ""]  # no bytes_read_min: no backward alone
    assert rows["gate_pooling spatial_pool fu2"][10:] == ["3.6", "2.2", "1.64"]
    assert rows["window_attention stage1"][1:] == ["fused", "", "", "", "", "8", "1.0", "1.0", "1.00", "", "", ""]
    assert {"layer_norm_cf stem96 (128, 96, 56, 56)", "layer_norm_cf down96 (128, 96, 56, 56)"} <= set(rows)
    # a counted run has no time: the main table says so, and the targets take none of it
    assert _rows(_run(counted).split("\n\n", 1)[1])["gate_pooling fwd spatial_pool fu1"][2] == "counted, not timed"
    out = tmp_path / "targets.md"
    _run(counted, "--targets", out)
    assert _rows(out.read_text())["window attention stage1, fwd+bwd"][2] == "not measured"
