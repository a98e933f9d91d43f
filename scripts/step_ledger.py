"""The step ledger: GPU launches and bytes of one bf16 HiFuse training step, counted on the CPU.

A training step's GPU time is set by what it launches and what those launches move. This
counts both without a GPU: the model runs on CPU tensors with every Triton launch replaced by
a record of the kernel and its tensors (TRITON_INTERPRET=1; nothing is run, so values are
garbage, which a step without host syncs does not mind), and a dispatch mode records every
aten op below autograd and autocast, including those inside the hifuse ops' implementations.

What is counted, per step (forward, cross-entropy, backward, fused AdamW):
- launches: one per Triton kernel launch, per native hifuse op call, and per aten op that
  writes memory (views, ``empty`` and other allocations launch nothing). Some aten ops launch
  more than one kernel on a GPU (a convolution's backward, a large reduction): the count is a
  floor for those;
- bytes: for a Triton kernel every tensor argument once, whole (an upper bound where a kernel
  reads part of one); for an op its tensor inputs and outputs once each (an in-place op reads
  and writes its tensor);
- kinds: ``triton`` and ``native`` (the fused kernels), ``gemm`` (cuBLAS and cuDNN: matrix
  products and convolutions), ``optimizer`` and ``glue`` (copies, casts, fills, elementwise
  ops and reductions around them; ``cast`` is the part of it that changes a dtype);
- block kinds: each launch is charged to the block whose forward made it, or whose forward
  made the autograd node that backward is running (stems and downsamples, global blocks,
  local blocks, fusion blocks; ``head`` for the classifier, the loss and the rest);
- autocast: CPU autocast in bf16 (its list of bf16 ops is CUDA's for every op HiFuse calls),
  with CUDA's float32 rules laid over it for the ops HiFuse calls that CUDA runs in float32
  (LayerNorm, softmax, log-softmax, sum, exp, rsqrt, pow on bf16 inputs); inside hifuse ops'
  implementations only CPU's rules apply;
- host time: call counts times per-call costs, the published ones until the GPU host's are
  measured: a Python ``custom_op`` call 11 us, a Triton launch through ``JITFunction.run``
  about 20 us (12 to 27 by its arguments), an eager aten op about 6 us with autograd (an
  assumption), nothing for a replayed CUDA graph.

Counted at two batch sizes (default 1 and 2) and fitted as a + b x batch, then written for
the batch sizes asked (default 32 and 128):

    python scripts/step_ledger.py [--fused both] [--image-size 224] [--batch 1,2] [--at 32,128] [--json FILE]

The narrow configuration (``--narrow``) is what the tests count; it takes other kernel paths
than the published width, so its figures are not HiFuse-Tiny's.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from dataclasses import dataclass, field

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._library.custom_ops import OPDEFS  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import hifuse  # noqa: E402
from hifuse import model as model_  # noqa: E402
from hifuse_kernels import _triton, reference  # noqa: E402

# The kernels' process-wide caches (shift masks, index tables) stay off under a dispatch mode,
# which is how FakeTensor tracing reaches them; this mode passes real tensors, so they are read
# as in a real step.
reference._tracing = torch.compiler.is_compiling

KINDS = ("triton", "native", "gemm", "optimizer", "glue")
GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward", "_convolution",
            "cudnn_convolution", "mkldnn_convolution", "_scaled_mm", "addbmm"}
NO_LAUNCH_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
                 "lift_fresh", "set_", "resize_", "_reshape_alias", "_unsafe_view", "view", "as_strided",
                 "is_same_size", "_has_compatible_shallow_copy_type", "sym_size", "sym_stride", "sym_numel",
                 "sym_storage_offset", "size", "stride", "dim", "is_contiguous", "_local_scalar_dense"}
BLOCKS = {  # module class -> block kind; the innermost hooked module wins
    model_.PatchEmbed: "stems and downsamples", model_.PatchMerging: "stems and downsamples",
    model_.LocalDownsample: "stems and downsamples", model_.GlobalBlock: "global blocks",
    model_.GlobalStage: "global blocks", model_.LocalBlock: "local blocks", model_.HFFBlock: "fusion blocks",
}
BLOCK_KINDS = ("stems and downsamples", "global blocks", "local blocks", "fusion blocks", "head")
# per-call host costs in microseconds (see the module docstring)
HOST_US = {"hifuse op": 11.0, "triton": 20.0, "aten": 6.0}


@dataclass
class Ledger:
    launches: collections.Counter = field(default_factory=collections.Counter)  # (kind, block) -> launches
    bytes: collections.Counter = field(default_factory=collections.Counter)  # (kind, block) -> bytes
    names: collections.Counter = field(default_factory=collections.Counter)  # (kind, name) -> launches
    name_bytes: collections.Counter = field(default_factory=collections.Counter)  # (kind, name) -> bytes
    casts: list = field(default_factory=lambda: [0, 0])  # launches, bytes
    hifuse_ops: int = 0
    aten_ops: int = 0  # aten calls at dispatch, launching or not (host work)

    def add(self, kind: str, block: str, name: str, nbytes: int) -> None:
        self.launches[kind, block] += 1
        self.bytes[kind, block] += nbytes
        self.names[kind, name] += 1
        self.name_bytes[kind, name] += nbytes

    def total(self, what: str, kind: str | None = None, block: str | None = None) -> int:
        counter = self.launches if what == "launches" else self.bytes
        return sum(v for (k, b), v in counter.items() if (kind is None or k == kind) and (block is None or b == block))

    def host_us(self) -> float:
        return (self.hifuse_ops * HOST_US["hifuse op"] + self.total("launches", "triton") * HOST_US["triton"]
                + self.aten_ops * HOST_US["aten"])


def _tensors(values) -> list[torch.Tensor]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(_tensors(v))
    return out


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


class _Blocks:
    """Which block is running: a stack of block kinds in forward (module hooks), and the block
    that made each autograd node, for backward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.stack: list[str] = []
        self.nodes: dict[int, str] = {}
        self.keep: list = []  # nodes alive, so their ids stay theirs
        self.handles = []
        for m in model.modules():
            kind = BLOCKS.get(type(m))
            if kind is not None:
                self.handles.append(m.register_forward_pre_hook(lambda _m, _a, kind=kind: self.stack.append(kind)))
                self.handles.append(m.register_forward_hook(lambda _m, _a, out, kind=kind: self._made(out, kind)))

    def _made(self, out, kind: str) -> None:
        self.stack.pop()
        todo = [t.grad_fn for t in _tensors([out]) if t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or id(node) in self.nodes:
                continue
            self.nodes[id(node)] = kind
            self.keep.append(node)
            todo.extend(n for n, _ in node.next_functions)

    def current(self) -> str:
        node = torch._C._current_autograd_node()
        if node is not None:
            return self.nodes.get(id(node), "head")
        return self.stack[-1] if self.stack else "head"

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class _Count(TorchDispatchMode):
    """Records every aten op below autograd and autocast; hifuse ops' Python implementations
    run with this mode on, so the ops inside them are seen too."""

    def __init__(self, ledger: Ledger, blocks: _Blocks) -> None:
        super().__init__()
        self.ledger, self.blocks = ledger, blocks

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace, name = func.namespace, func._schema.name.split("::")[-1]
        if namespace == "hifuse":
            self.ledger.hifuse_ops += 1
            opdef = OPDEFS.get(f"hifuse::{name}")
            if opdef is not None:  # a Triton op: run its implementation here, counted
                with self:
                    return opdef._init_fn(*args, **kwargs)
            out = func(*args, **kwargs)  # a native op: one kernel
            self.ledger.add("native", self.blocks.current(), name, _nbytes(_tensors([args, kwargs, out])))
            return out
        self.ledger.aten_ops += 1
        out = func(*args, **kwargs)
        if name in NO_LAUNCH_OPS or _is_view(func) or not (_tensors([out]) or func._schema.is_mutable):
            return out
        kind = ("gemm" if name in GEMM_OPS else "optimizer" if "adam" in name or name.startswith("_foreach")
                else "glue")
        nbytes = _nbytes(_tensors([args, kwargs])) + _nbytes(_tensors([out]))
        self.ledger.add(kind, self.blocks.current(), name, nbytes)
        if name in ("_to_copy", "copy_") and _changes_dtype(args, kwargs, out):
            self.ledger.casts[0] += 1
            self.ledger.casts[1] += nbytes
        return out


def _is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _changes_dtype(args, kwargs, out) -> bool:
    src = _tensors([args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else args[0]])
    dst = _tensors([out])
    return bool(src and dst and src[0].dtype != dst[0].dtype)


class _Launches:
    """Stands for ``wrap_triton(kernel)``: ``[grid](...)`` records the launch, runs nothing."""

    def __init__(self, ledger: Ledger, blocks: _Blocks) -> None:
        self.ledger, self.blocks = ledger, blocks

    def __call__(self, kernel):
        name = getattr(kernel, "__name__", repr(kernel))
        module = getattr(getattr(kernel, "fn", None), "__module__", "") or ""
        label = f"{module.rsplit('.', 1)[-1]}.{name}" if module else name

        class Launch:
            def __getitem__(_self, grid):
                def launch(*args, **kwargs) -> None:
                    self.ledger.add("triton", self.blocks.current(), label, _nbytes(_tensors([args, kwargs.values()])))

                return launch

        return Launch()


# ops CUDA's autocast runs in float32 where CPU's leaves them in bf16 (module docstring)
_CUDA_FP32 = {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
              torch.Tensor.softmax, torch.Tensor.log_softmax, torch.layer_norm, torch.exp, torch.Tensor.exp,
              torch.rsqrt, torch.Tensor.rsqrt, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.sum,
              torch.Tensor.sum, torch.logsumexp, torch.Tensor.logsumexp, F.nll_loss}


class _CudaFloat32Ops(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CUDA_FP32 and torch.is_autocast_enabled("cpu"):
            def up(v):
                if isinstance(v, torch.Tensor) and v.dtype in (torch.bfloat16, torch.float16):
                    return v.float()
                return v
            args = tuple(up(a) for a in args)
            kwargs = {k: up(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def build(args, batch: int):
    from hifuse.cli.bench import no_decay_groups

    torch.manual_seed(0)
    if args.narrow:
        model = hifuse.create_model("hifuse_tiny", num_classes=7, depths=(1, 2, 1, 1), dims=(16, 32, 64, 128),
                                    num_heads=(1, 1, 2, 2))
    else:
        model = hifuse.create_model(args.variant, num_classes=7)
    model = model.to(memory_format=torch.channels_last).train()
    x = torch.randn(batch, 3, args.image_size, args.image_size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (batch,))
    opt = torch.optim.AdamW(no_decay_groups(model, 0.01), lr=1e-4, fused=True)
    return model, x, y, opt


def count(fused: bool, batch: int, args) -> Ledger:
    """One training step's ledger, after a warm-up step (lazy state, per-shape decisions)."""
    model, x, y, opt = build(args, batch)
    ledger = Ledger()
    blocks = _Blocks(model)
    _triton.wrap_triton = _Launches(Ledger(), blocks)

    def step():
        opt.zero_grad(set_to_none=True)
        with hifuse.use_fused(fused), torch.autocast("cpu", dtype=torch.bfloat16), _CudaFloat32Ops():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    step()  # warm-up, not counted
    _triton.wrap_triton = _Launches(ledger, blocks)
    with _Count(ledger, blocks):
        step()
    blocks.close()
    return ledger


def fit(small: Ledger, large: Ledger, b0: int, b1: int, at: int, what: str, **where) -> float:
    """a + b x batch through the two counts, at ``at``."""
    v0, v1 = small.total(what, **where), large.total(what, **where)
    slope = (v1 - v0) / (b1 - b0)
    return v0 + slope * (at - b0)


def report(ledgers: dict, batches: tuple[int, int], at: list[int]) -> dict:
    b0, b1 = batches
    result = {}
    for name, (small, large) in ledgers.items():
        rows = {}
        for n in at:
            row = {"launches": fit(small, large, b0, b1, n, "launches"), "GB": fit(small, large, b0, b1, n, "bytes") / 1e9}
            for kind in KINDS:
                row[f"{kind} launches"] = fit(small, large, b0, b1, n, "launches", kind=kind)
                row[f"{kind} GB"] = fit(small, large, b0, b1, n, "bytes", kind=kind) / 1e9
            for block in BLOCK_KINDS:
                row[f"{block} launches"] = fit(small, large, b0, b1, n, "launches", block=block)
                row[f"{block} glue GB"] = fit(small, large, b0, b1, n, "bytes", kind="glue", block=block) / 1e9
            cast_slope = (large.casts[1] - small.casts[1]) / (b1 - b0)
            row["cast launches"] = large.casts[0]
            row["cast GB"] = (small.casts[1] + cast_slope * (n - b0)) / 1e9
            row["hifuse op calls"] = large.hifuse_ops
            row["aten op calls"] = large.aten_ops
            row["host ms (estimate)"] = large.host_us() / 1e3
            rows[n] = row
        glue = collections.Counter()
        for (kind, op), v in large.name_bytes.items():
            if kind == "glue":
                glue[op] += v - small.name_bytes[kind, op]
        triton = {op: v for (kind, op), v in large.names.items() if kind == "triton"}
        result[name] = {"at": rows, "glue ops by GB per image": {op: v / (b1 - b0) / 1e9 for op, v in glue.most_common(15)},
                        "triton launches": dict(sorted(triton.items(), key=lambda kv: -kv[1])),
                        "glue launches by op": {op: v for (kind, op), v in large.names.most_common() if kind == "glue"}}
    return result


def print_report(result: dict, at: list[int]) -> None:
    names = list(result)
    keys = list(result[names[0]]["at"][at[0]])
    for n in at:
        print(f"\nbatch {n}:")
        print(f"{'':28s}" + "".join(f"{name:>14s}" for name in names))
        for k in keys:
            print(f"{k:28s}" + "".join(f"{result[name]['at'][n][k]:14.1f}" for name in names))
    for name in names:
        print(f"\n{name}: glue GB per image by op: "
              + ", ".join(f"{op} {v:.3f}" for op, v in result[name]["glue ops by GB per image"].items()))
        print(f"{name}: glue launches by op: "
              + ", ".join(f"{op} {v}" for op, v in list(result[name]["glue launches by op"].items())[:15]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="hifuse_tiny")
    parser.add_argument("--narrow", action="store_true", help="the tests' narrow model (another kernel path)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", default="2,3", help="the two batch sizes counted (batch 1 takes other paths in places)")
    parser.add_argument("--at", default="32,128", help="batch sizes the fit is written for")
    parser.add_argument("--fused", choices=["both", "fused", "eager"], default="both")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = tuple(int(b) for b in args.batch.split(","))
    at = [int(b) for b in args.at.split(",")]
    if len(batches) != 2 or batches[0] == batches[1]:
        parser.error("--batch takes two different batch sizes")
    if _triton.INTERPRETER_PROBLEM is not None:
        sys.exit(f"the fused ops cannot run on CPU tensors here: {_triton.INTERPRETER_PROBLEM}")
    which = {"both": (False, True), "fused": (True,), "eager": (False,)}[args.fused]
    start = time.perf_counter()
    with _triton.device_tiles(True):  # the GPU's launch shapes, not the interpreter's wide ones
        ledgers = {("fused" if f else "eager"): tuple(count(f, b, args) for b in batches) for f in which}
    result = report(ledgers, batches, at)
    what = "narrow HiFuse" if args.narrow else args.variant
    print(f"{what} {args.image_size}x{args.image_size}, bf16 autocast (CUDA's float32 ops), channels-last, one training "
          f"step with fused AdamW; counted at batch {batches[0]} and {batches[1]}, torch {torch.__version__} "
          f"({time.perf_counter() - start:.0f} s)")
    print_report(result, at)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": what, "image_size": args.image_size, "counted_at": batches, "torch": torch.__version__,
                       "result": {k: {**v, "at": {str(n): r for n, r in v["at"].items()}} for k, v in result.items()}},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
