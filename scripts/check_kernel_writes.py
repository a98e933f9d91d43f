"""Check what torch.compile believes each Triton kernel writes, without a GPU.

Inside torch.compile (and under functionalization, as in aot_eager), the ops wrap their
kernels with ``torch.library.wrap_triton``, and torch reads the kernel's TTIR to find which
pointer arguments it stores through. Where it names an input (a weight, say) the compiled
graph clones and writes it back, and a leaf that requires grad fails the whole compile
("a leaf Variable that requires grad is being used in an in-place operation"); where it
misses an output, Inductor may drop or reorder the kernel. The analysis changes with torch
and triton: every variant of ``check_triton_compile.cases`` must give exactly WRITES. Usage:

    python scripts/check_kernel_writes.py [--arch 90]

Must run without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the analysis reads compiled kernels")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_triton_compile import DTYPES, FLOATS, cases  # noqa: E402



def _rebuilt(constexprs: dict, name: str) -> set:
    """The output a backward kernel's REBUILD variant writes the forward's values to."""
    return {name} if constexprs.get("REBUILD") else set()


# The pointer arguments each kernel stores through (some only under a constexpr, given the
# variant's constexprs): nothing else may be called written.
WRITES = {
    "window_attention._fwd_kernel": {"OUT", "LSE"},
    "window_attention._bwd_kernel": lambda k: {"DQKV", "DBIAS_PART"} | ({"DS_PART"} if k["ON_CHIP"] else {"DS_SLOT"}),
    "dwconv_layer_norm._fwd_kernel": {"OUT", "MEAN", "RSTD"},
    "dwconv_layer_norm._bwd_kernel": lambda k: {"DX", "SLOTS", "PART"} | _rebuilt(k, "OUT"),
    "gelu_linear._fwd_kernel": {"OUT"},
    "gelu_linear._bwd_input_kernel": {"DH"},
    "gelu_linear._bwd_weight_kernel": {"PART"},
    "gelu_linear._bwd_kernel": {"DH", "PART"},
    "gelu_residual._fwd_kernel": {"OUT"},
    "gelu_residual._bwd_kernel": {"DY"},
    "batch_norm_act._stats_kernel": {"MEAN_PART", "M2_PART", "COUNT_PART"},
    "batch_norm_act._stats_combine_kernel": lambda k: {"MEAN", "INVSTD", "VAR"} | (
        {"RUN_MEAN", "RUN_VAR", "NBT"} if k["UPDATE"] else set()),
    "batch_norm_act._apply_kernel": {"OUT"},
    "batch_norm_act._apply_pool_kernel": {"OUT"},
    "batch_norm_act._bwd_reduce_kernel": lambda k: {"SUM_DZ_PART", "SUM_DZXH_PART"} | _rebuilt(k, "OUT"),
    "batch_norm_act._bwd_sums_kernel": lambda k: {"SUM_DZ", "SUM_DZXH"} | ({"DW", "DB"} if k.get("PARAMS", True)
                                                                            else set()),
    "batch_norm_act._bwd_apply_kernel": lambda k: {"DY"} | ({"DR"} if k["PROLOGUE"] or k.get("GATED") else set()),
    "residual_layer_norm._fwd_kernel": lambda k: {"NORMED", "MEAN", "RSTD"} | ({"OUT"} if k["PROLOGUE"] else set()),
    "residual_layer_norm._bwd_kernel": lambda k: {"DS", "PART_W", "PART_B"} | ({"DY"} if k["PROLOGUE"] else set())
    | _rebuilt(k, "NORMED"),
    "channel_pool._channel_pool_kernel": lambda k: {"SUM", "MAX", "ARG"} | ({"LOW"} if k["HAS_LOW"] else set()),
    "window_attention._dense_bias_kernel": {"OUT"},
    "window_attention._bwd_finish_kernel": {"DTABLE", "DBIAS"},
    "channel_pool._channel_pool_combine_kernel": {"AVG", "BEST", "OUT_ARG"},
    "channel_gate._fwd_kernel": {"H", "GATE"},
    "channel_gate._bwd_kernel": {"DS", "DH", "DX"},
    "channel_gate._bwd_weight_kernel": {"DW1", "DW2"},
    "channel_pool._channel_pool_bwd_kernel": {"DG"},
    "spatial_pool._spatial_pool_kernel": lambda k: {"OUT"} | ({"LOW"} if k["HAS_LOW"] else set()),
    "spatial_pool._spatial_pool_bwd_kernel": {"DL"},
    "gated_layer_norm._gated_ln_kernel": lambda k: {"OUT", "MEAN", "RSTD"} | ({"OUT2"} if k["HAS_OUT2"] else set()),
    "gated_layer_norm._gated_ln_bwd_kernel": lambda k: {"DG", "DL", "DSG", "DX", "PART_CG", "PART_W", "PART_B"} | (
        {"BN_SUMS"} if k["SUMS"] else set()),
    "layer_norm_cat._rows_fwd_kernel": {"OUT", "MEAN", "RSTD"},
    "patch_conv_norm._fwd_kernel": {"OUT", "MEAN", "RSTD"},
    "patch_conv_norm._bwd_kernel": {"PART"},
    "layer_norm_cat._rows_bwd_kernel": lambda k: {"DA", "PART_W", "PART_B"} | ({"DB"} if k["PARTS"] > 1 else set())
    | ({"DD"} if k["PARTS"] > 2 else set()) | _rebuilt(k, "OUT") | ({"BN_SUMS"} if k.get("BN") and k.get("SUMS", True) else set()),
}

TORCH_DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "i32": torch.int32, "i64": torch.int64}


class _Target:
    """A driver that names the GPU the analysis compiles for (there is none here)."""

    def __init__(self, arch: int) -> None:
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)


def kernel_name(kernel) -> str:
    return f"{kernel.fn.__module__.split('.')[-1]}.{kernel.fn.__name__}"


def arguments(kernel, pointers: dict, constexprs: dict, dtype: str) -> dict:
    """Arguments a launch of this variant passes: small CPU tensors for the pointers."""
    kwargs = {}
    for p in kernel.params:
        if p.is_constexpr:
            kwargs[p.name] = constexprs[p.name]
        elif p.name in pointers:
            kind = pointers[p.name]
            kwargs[p.name] = torch.empty(64, dtype=TORCH_DTYPES[DTYPES[dtype] if kind == "dt" else kind])
        elif p.name in FLOATS:
            kwargs[p.name] = 1.0
        else:
            kwargs[p.name] = 7
    return kwargs


def written(kernel, kwargs: dict) -> tuple[set[str], str | None]:
    """(the arguments torch's analysis says the kernel writes, the analysis' error or None)."""
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    errors = []

    class Catch:  # the analysis logs its failure and answers "every argument"
        def warning(self, msg, *args, **kwargs):
            errors.append(msg % args if args else msg)

        def __getattr__(self, name):
            return lambda *a, **k: None

    log, wrap.log = wrap.log, Catch()
    try:
        if hasattr(wrap, "identify_accessed_tensors"):
            accesses = wrap.identify_accessed_tensors(kernel, kwargs, {})
            names = [dep.name for dep in accesses.read_writes.writes]
        else:  # torch before 2.12
            names = wrap.identify_mutated_tensors(kernel, kwargs, {})
    finally:
        wrap.log = log
    return {n for n in names if isinstance(kwargs.get(n), torch.Tensor)}, (errors[0] if errors else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    triton.runtime.driver.set_active(_Target(args.arch))
    failures = checked = 0
    reported = set()
    for dtype in DTYPES:
        for kernel, pointers, constexprs in cases(dtype):
            name = kernel_name(kernel)
            constexprs = {k: v for k, v in constexprs.items() if k != "WARPS"}
            found, error = written(kernel, arguments(kernel, pointers, constexprs, dtype))
            expected = WRITES.get(name)
            if callable(expected):
                expected = expected(constexprs)
            checked += 1
            if expected is None:
                problem = "not in WRITES"
            elif error is not None:
                problem = f"the analysis failed ({error}), so every argument counts as written"
            elif found != expected:
                extra, missing = sorted(found - expected), sorted(expected - found)
                problem = "; ".join(filter(None, [extra and f"inputs called written: {extra}",
                                                  missing and f"writes missed: {missing}"]))
            else:
                continue
            failures += 1
            key = (name, problem)
            if key not in reported:  # one line per kernel and problem, not per variant
                reported.add(key)
                print(f"FAIL {name} ({dtype}, {constexprs}): {problem}", flush=True)
    print(f"torch {torch.__version__}, triton {triton.__version__}: {checked} kernel variants, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
