"""The step ledger: GPU launches and bytes of one bf16 HiFuse training step, counted on the CPU.

A training step's GPU time is set by what it launches and what those launches move. This
counts both without a GPU, by ``benchmarks/byte_model.py`` (which says what a launch and its
bytes are, and the kinds ``triton``, ``native``, ``gemm``, ``optimizer``, ``glue`` and
``cast``): the model runs on CPU tensors (TRITON_INTERPRET=1) with every Triton launch
recorded, not run, and every aten op below autograd and autocast recorded, including those
inside the hifuse ops' implementations.

What is counted, per step (forward, cross-entropy, backward, fused AdamW), besides launches
and bytes by kind:
- the GEMM kernels' tile traffic: what the programs of the Triton GEMMs move between L2 and
  the SMs, each shared tile counted every time one loads it (``byte_model``);
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

The fused step is counted at each batch size asked (default 32 and 128; at batch 128 about a
minute and 8 GB of memory). Eager's, which needs far more memory, is counted at two small batch
sizes (``--batch``, default 2 and 3: batch 1 takes other paths in places) and fitted as
a + b x batch, exact for it; ``--fit`` fits the fused step's too, quicker but not exact: its
fixed-grid reductions stop adding programs (and partial sums) at one wave of the GPU, so a fit
from small batches overstates them, several GB at batch 128. Reductions split their rows as on a
GPU of ``--sms`` SMs (132, an H100's or H200's), the programs an SM holds taken from the
kernels' warps (an upper bound: registers may allow fewer):

    python scripts/step_ledger.py [--fused both] [--image-size 224] [--at 32,128] [--fit] [--batch 2,3] [--json FILE]

The narrow configuration (``--narrow``) is what the tests count; it takes other kernel paths
than the published width, so its figures are not HiFuse-Tiny's.

``--launches FILE`` also writes every Triton launch of the fused steps counted, and of a fused
inference forward (eval mode) at the same batch sizes, with what of its arguments decides the
variant Triton compiles for it (a tensor's element type and 16-byte alignment, an int's value,
the constexprs and launch options), for ``check_triton_compile.py --launches FILE`` to compile
exactly those variants.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import inspect
import json
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import hifuse  # noqa: E402
from byte_model import KINDS, CudaFloat32Ops, Ledger, counted, launches_recorded, tensors  # noqa: E402
from hifuse import model as model_  # noqa: E402
from hifuse_kernels import _triton  # noqa: E402

BLOCKS = {  # module class -> block kind; the innermost hooked module wins
    model_.PatchEmbed: "stems and downsamples", model_.PatchMerging: "stems and downsamples",
    model_.LocalDownsample: "stems and downsamples", model_.GlobalBlock: "global blocks",
    model_.GlobalStage: "global blocks", model_.LocalBlock: "local blocks", model_.HFFBlock: "fusion blocks",
}
BLOCK_KINDS = ("stems and downsamples", "global blocks", "local blocks", "fusion blocks", "head")
# per-call host costs in microseconds (see the module docstring)
HOST_US = {"hifuse op": 11.0, "triton": 20.0, "aten": 6.0}


def host_us(ledger: Ledger) -> float:
    return (ledger.hifuse_ops * HOST_US["hifuse op"] + ledger.total("launches", "triton") * HOST_US["triton"]
            + ledger.aten_ops * HOST_US["aten"])


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
        todo = [t.grad_fn for t in tensors([out]) if t.grad_fn is not None]
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


class LaunchRecords:
    """Each distinct Triton launch (``on_launch`` of ``byte_model.RecordLaunches``) and how
    often it was made: the kernel, each argument as it decides the compiled variant (a
    tensor's pointer type and whether it is 16-byte aligned, an int's value, a float, any
    other value as given) and the launch options (num_warps, num_stages)."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()

    @staticmethod
    def _arg(value):
        import triton.language as tl
        from triton.runtime.jit import mangle_type

        if isinstance(value, torch.Tensor):
            return {"pointer": mangle_type(value), "aligned": value.data_ptr() % 16 == 0}
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return {"value": value}
        if isinstance(value, int):
            return {"int": value}
        if isinstance(value, float):
            return {"float": value}
        if isinstance(value, tl.dtype):
            return {"dtype": value.name}
        raise TypeError(f"cannot record a launch argument of type {type(value).__name__}")

    def __call__(self, kernel, args, kwargs) -> None:
        fn = getattr(kernel, "fn", kernel)
        names = list(inspect.signature(fn).parameters)
        bound = {**dict(zip(names, args)), **{k: v for k, v in kwargs.items() if k in names}}
        record = {"kernel": f"{fn.__module__}.{fn.__name__}", "args": {k: self._arg(v) for k, v in bound.items()},
                  "options": {k: v for k, v in kwargs.items() if k not in names}}
        self.counts[json.dumps(record, sort_keys=True)] += 1

    def write(self, path: str, **about) -> None:
        launches = [{"launches": n, **json.loads(key)} for key, n in sorted(self.counts.items())]
        with open(path, "w") as f:
            json.dump({**about, "launches": launches}, f, indent=1)


def _as_on_gpu(args):
    """Launches as a GPU of ``args.sms`` SMs makes them: its tiles, reduction grids and choices."""
    stack = contextlib.ExitStack()
    for context in (_triton.device_tiles(True), _triton.modelled_sms(args.sms), _triton.gpu_launches()):
        stack.enter_context(context)
    return stack


def count(fused: bool, batch: int, args, on_launch=None) -> Ledger:
    """One training step's ledger, after a warm-up step (lazy state, per-shape decisions),
    with the GPU's launch shapes; ``on_launch`` sees the Triton launches of both steps."""
    model, x, y, opt = build(args, batch)
    ledger = Ledger()
    blocks = _Blocks(model)

    def step():
        opt.zero_grad(set_to_none=True)
        with CudaFloat32Ops():  # backward too: its GEMMs take their CUDA paths
            with hifuse.use_fused(fused), torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
        opt.step()

    with _as_on_gpu(args):
        with launches_recorded(Ledger(), blocks.current, on_launch):
            step()  # warm-up, not counted
        with counted(ledger, blocks.current, on_launch):
            step()
    blocks.close()
    return ledger


def record_inference(batch: int, args, on_launch) -> None:
    """The Triton launches of a fused bf16 inference forward (eval mode: the BatchNorms folded)
    at ``batch``, for ``on_launch``; nothing counted."""
    model, x, _y, _opt = build(args, batch)
    model.eval()
    with _as_on_gpu(args):
        with launches_recorded(Ledger(), on_launch=on_launch), CudaFloat32Ops(), torch.no_grad():
            with hifuse.use_fused(True), torch.autocast("cpu", dtype=torch.bfloat16):
                model(x)


def fit(small: Ledger, large: Ledger, b0: int, b1: int, at: int, what: str, **where) -> float:
    """a + b x batch through the two counts, at ``at``."""
    v0, v1 = small.total(what, **where), large.total(what, **where)
    return v0 + (v1 - v0) / (b1 - b0) * (at - b0)


def _row(value, ledger: Ledger, cast_bytes: float) -> dict:
    """A report row: ``value(what, kind=, where=)`` gives a total (counted, or fitted) at the
    row's batch size; ``ledger`` the counts that do not depend on it."""
    row = {"launches": value("launches"), "GB": value("bytes") / 1e9}
    for kind in KINDS:
        row[f"{kind} launches"] = value("launches", kind=kind)
        row[f"{kind} GB"] = value("bytes", kind=kind) / 1e9
    for block in BLOCK_KINDS:
        row[f"{block} launches"] = value("launches", where=block)
        row[f"{block} glue GB"] = value("bytes", kind="glue", where=block) / 1e9
    row["GEMM tiles GB via L2"] = value("tile_bytes") / 1e9  # byte_model's tile traffic
    row["cast launches"] = ledger.casts[0]
    row["cast GB"] = cast_bytes / 1e9
    row["hifuse op calls"] = ledger.hifuse_ops
    row["aten op calls"] = ledger.aten_ops
    row["host ms (estimate)"] = host_us(ledger) / 1e3
    return row


def report(ledgers: dict, batches: tuple[int, int], at: list[int]) -> dict:
    """Rows at each of ``at``: from ledgers counted there (name -> {batch: ledger}), or fitted
    through the two counted at ``batches`` (name -> (small, large))."""
    result = {}
    for name, made in ledgers.items():
        glue = collections.Counter()  # glue bytes per image by op
        if isinstance(made, dict):
            rows = {n: _row(made[n].total, made[n], made[n].casts[1]) for n in at}
            largest = max(at)
            large = made[largest]
            for (kind, op), v in large.name_bytes.items():
                if kind == "glue":
                    glue[op] += v / largest
        else:
            (b0, b1), (small, large) = batches, made
            rows = {}
            for n in at:
                cast_bytes = small.casts[1] + (large.casts[1] - small.casts[1]) / (b1 - b0) * (n - b0)
                rows[n] = _row(lambda what, n=n, **where: fit(small, large, b0, b1, n, what, **where), large,
                               cast_bytes)
            for (kind, op), v in large.name_bytes.items():
                if kind == "glue":
                    glue[op] += (v - small.name_bytes[kind, op]) / (b1 - b0)
        triton = {op: v for (kind, op), v in large.names.items() if kind == "triton"}
        result[name] = {"at": rows, "glue ops by GB per image": {op: v / 1e9 for op, v in glue.most_common(15)},
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
    parser.add_argument("--batch", default="2,3", help="the two batch sizes a fit counts (batch 1 takes other paths in places)")
    parser.add_argument("--at", default="32,128", help="batch sizes the report is written for")
    parser.add_argument("--fit", action="store_true", help="fit the fused step's counts too (quick, overstates partials)")
    parser.add_argument("--sms", type=int, default=132, help="SMs of the GPU whose reduction grids are modelled")
    parser.add_argument("--fused", choices=["both", "fused", "eager"], default="both")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--launches", help="also write the fused steps' Triton launches here (for check_triton_compile.py)")
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
    if args.launches and True not in which:
        parser.error("--launches records the fused steps: not with --fused eager")
    records = LaunchRecords() if args.launches else None
    start = time.perf_counter()
    ledgers, how = {}, []
    for fused in which:
        name = "fused" if fused else "eager"
        if fused and not args.fit:
            ledgers[name] = {b: count(True, b, args, records) for b in at}
            how.append(f"{name} counted at batch {', '.join(map(str, at))}")
        else:
            ledgers[name] = tuple(count(fused, b, args, records if fused else None) for b in batches)
            how.append(f"{name} counted at batch {batches[0]} and {batches[1]} and fitted")
    how = "; ".join(how)
    result = report(ledgers, batches, at)
    what = "narrow HiFuse" if args.narrow else args.variant
    print(f"{what} {args.image_size}x{args.image_size}, bf16 autocast (CUDA's float32 ops), channels-last, one training "
          f"step with fused AdamW; {how}; reductions as on {args.sms} SMs; torch {torch.__version__} "
          f"({time.perf_counter() - start:.0f} s)")
    print_report(result, at)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": what, "image_size": args.image_size, "how": how, "sms": args.sms, "torch": torch.__version__,
                       "result": {k: {**v, "at": {str(n): r for n, r in v["at"].items()}} for k, v in result.items()}},
                      f, indent=1)
    if records is not None:
        for b in at:
            record_inference(b, args, records)
        records.write(args.launches, model=what, image_size=args.image_size,
                      how=f"{how}; and a fused inference forward at batch {', '.join(map(str, at))}",
                      torch=torch.__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
