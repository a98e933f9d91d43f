"""Shared test helpers: the published model's parity fixture and reference files."""

from __future__ import annotations

import contextlib
import json
import math
import zlib
from functools import lru_cache
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (N, C, H, W) feature maps: batch 1, odd and prime sides, 1x1, every stage width
# Error-path tests run on both; a CUDA run also mixes in a CPU tensor ("meta" on a CPU run).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def other_device(device: str) -> str:
    return "meta" if device == "cpu" else "cpu"


FEATURE_SHAPES = [(1, 96, 7, 5), (2, 192, 3, 13), (1, 768, 1, 1), (2, 384, 2, 3), (3, 20, 4, 4)]


def triton_device_or_skip():
    """A module mark that skips where Triton kernels cannot run on DEVICE's tensors."""
    from hifuse_kernels import _triton

    reason = _triton.unsupported_reason(torch.zeros(1, device=DEVICE))
    return pytest.mark.skipif(reason is not None, reason=str(reason))


@lru_cache(maxsize=None)
def official(variant: str) -> dict:
    """The published model's state_dict layout and parity figures for a variant."""
    return json.loads((DATA / f"official_{variant}.json").read_text())


def fixture_value(key: str, like: torch.Tensor, seed_base: int) -> torch.Tensor:
    """Deterministic value of one state_dict entry under the parity fixture rule."""
    g = torch.Generator().manual_seed(seed_base + zlib.crc32(key.encode()))
    shape = like.shape

    def randn() -> torch.Tensor:
        return torch.randn(shape, generator=g)

    if key.endswith("running_var"):
        v = 0.5 + torch.rand(shape, generator=g)
    elif key.endswith("running_mean"):
        v = 0.1 * randn()
    elif key.endswith("relative_position_bias_table"):
        v = 0.5 * randn()
    elif like.dim() == 1 and key.endswith("weight"):
        v = 1 + 0.1 * randn()
    elif like.dim() == 1 and key.endswith("bias"):
        v = 0.02 * randn()
    else:
        v = randn() / math.sqrt(math.prod(shape[1:]))
    return v.to(like.dtype)


def apply_fixture(model: torch.nn.Module, seed_base: int = 0) -> torch.nn.Module:
    """Fill every floating state_dict entry of ``model`` by the fixture rule (in place)."""
    state = model.state_dict()
    new = {
        k: fixture_value(k, v, seed_base) if v.is_floating_point() else v for k, v in state.items()
    }
    model.load_state_dict(new)
    return model


def fixture_input(expr: str) -> torch.Tensor:
    """Evaluate the fixture's input expression (only torch is in scope)."""
    return eval(expr, {"__builtins__": {}}, {"torch": torch})  # noqa: S307 - test data we ship


def module_stats(model: torch.nn.Module, names, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Run model(x) and collect per-sample sum and sum of squares of each named module's output."""
    stats = {}
    modules = dict(model.named_modules())
    hooks = []
    for name in names:

        def hook(_m, _inp, out, name=name):
            out = out[0] if isinstance(out, tuple) else out
            flat = out.reshape(out.shape[0], -1).double()
            stats[name] = {
                "sum": flat.sum(1).tolist(),
                "sumsq": (flat * flat).sum(1).tolist(),
                "shape": list(out.shape),
            }

        hooks.append(modules[name].register_forward_hook(hook))
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return out, stats


# Whole-model tests on the CPU (Triton interpreter): one block per stage but two in the second,
# whose grid still shifts its windows at 32x32 and 64x64 inputs, and narrow stages (head dim
# 16): every module kind and the block-to-block hand-over, at a fraction of Tiny's time.
CPU_DEPTHS = (1, 2, 1, 1)
CPU_MODEL = {"depths": CPU_DEPTHS, "dims": (32, 64, 128, 256), "num_heads": (2, 4, 8, 16)}


def whole_model_kwargs(device) -> dict:
    """create_model arguments of the whole-model tests: Tiny on a GPU, ``CPU_MODEL`` on a CPU."""
    return {} if torch.device(device).type == "cuda" else dict(CPU_MODEL)


def assert_model_matches_eager(device, rtol=1e-4, atol=1e-4, grad_rtol=1e-3, grad_atol=1e-4, train=True, **parts):
    """HiFuse-Tiny at 64x64 (every window grid padded) with ``parts`` fused vs eager:
    logits and the gradient of every parameter, in training or eval mode. On the CPU with
    fewer, narrower blocks (see ``CPU_MODEL``)."""
    import hifuse

    torch.manual_seed(0)
    model = hifuse.create_model("hifuse_tiny", num_classes=3, **whole_model_kwargs(device)).to(device).train(train)
    x = torch.randn(1, 3, 64, 64, device=device)
    ref = model(x)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with hifuse.use_fused(**parts):
        out = model(x)
        out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    params = dict(model.named_parameters())
    for name, g in ref_grads.items():
        torch.testing.assert_close(params[name].grad, g, rtol=grad_rtol, atol=grad_atol, msg=name)


def assert_autocast_within_eager_error(module, inputs, dtype=torch.bfloat16, **parts):
    """``module`` with ``parts`` fused under autocast against float64 eager on the same
    inputs: the output and every input and parameter gradient may be off by at most twice
    the most that eager under the same autocast is off on four inputs (these and three moved
    by one part in 2**8), plus one rounding step of ``dtype`` at the reference's scale. A
    fused run outside is judged again on moved inputs and fails only where both are outside:
    one eager run is no yardstick for gradients that pass a training BatchNorm over a few
    pixels (the spatial gates'), whose 16-bit errors swing from draw to draw."""
    import copy

    import hifuse

    device = inputs[0].device.type

    def run(m, xs, fused, autocast):
        xs = [t.detach().clone().requires_grad_() for t in xs]
        with torch.autocast(device, dtype=dtype, enabled=autocast), hifuse.use_fused(fused, **parts):
            out = m(*xs)
        out = out[0] if isinstance(out, tuple) else out
        grads = torch.autograd.grad(out.float().square().sum(), [*xs, *m.parameters()], allow_unused=True)
        return [out.double()] + [g.double() if g is not None else None for g in grads]

    def errors(xs, fused):
        ref = run(copy.deepcopy(module).double(), [t.double() for t in xs], False, False)
        got = run(copy.deepcopy(module), xs, fused, True)
        return [None if r is None else ((a - r).abs().max().item(), r.abs().max().item()) for a, r in zip(got, ref)]

    gen = torch.Generator().manual_seed(1)
    moved = [[(t.detach() * (1 + 2.0 ** -8 * torch.randn(t.shape, generator=gen).to(t.device))).to(t.dtype)
              for t in inputs] for _ in range(3)]
    eager = [errors(xs, False) for xs in [inputs, *moved]]
    ulp = torch.finfo(dtype).eps
    allowed = [None if e is None else 2 * max(run_[k][0] for run_ in eager) + ulp * e[1]
               for k, e in enumerate(eager[0])]

    def outside(xs):
        return {k: f"output {k}: fused {e[0]:.3g}, allowed {allowed[k]:.3g}"
                for k, e in enumerate(errors(xs, True)) if e is not None and e[0] > allowed[k]}

    first = outside(inputs)
    both = {k: why for k, why in outside(moved[0]).items() if k in first} if first else {}
    assert not both, f"fused errors against float64 outside eager's on two inputs: {list(both.values())}"


def feature(shape, seed, channels_last=True, dtype=torch.float32, device="cpu"):
    """A random (N, C, H, W) feature map that requires grad, channels-last by default."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(device, dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_()


def check_grads(out, ref, inputs, rtol=1e-5, atol=1e-5, grad=None):
    """out against ref, then the gradients of inputs for one upstream gradient."""
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    grad = torch.randn_like(ref) if grad is None else grad
    for k, (a, r) in enumerate(zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad))):
        torch.testing.assert_close(a, r, rtol=10 * rtol, atol=10 * atol, msg=f"gradient {k}")


def gated_inputs(shape, seed=0, device="cpu"):
    """Inputs of gated_layer_norm: g, channel_gate, l, spatial_gate, x, weight, bias."""
    n, c, h, w = shape
    g, l, x = (feature(shape, seed + k, device=device) for k in range(3))
    gen = torch.Generator().manual_seed(seed + 3)
    cg = torch.rand(n, c, 1, 1, generator=gen).to(device).requires_grad_()
    sg = torch.rand(n, 1, h, w, generator=gen).to(device).requires_grad_()
    weight = (1 + 0.1 * torch.randn(3 * c, generator=gen)).to(device).requires_grad_()
    bias = (0.1 * torch.randn(3 * c, generator=gen)).to(device).requires_grad_()
    return [g, cg, l, sg, x, weight, bias]


def assert_pool_writes_the_cast(pool, op, t, dtype, bad_dtype, **kwargs):
    """A pooling's ``low_dtype`` (``spatial_pool``, ``channel_pool``; ``op`` its registered
    cast variant): with ``chain``, the same pools, t handed on, and t cast to ``dtype`` (the
    bits of ``t.to(dtype)``, channels-last), taking no gradient; t's gradient as without it;
    refused without ``chain``, and for ``bad_dtype``."""
    pooled, again, low = pool(t, chain=True, low_dtype=dtype, **kwargs)
    plain, again_plain = pool(t, chain=True, **kwargs)
    assert torch.equal(pooled, plain) and again.data_ptr() == t.data_ptr()
    assert low.dtype == dtype and low.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(low, t.detach().to(dtype)) and not low.requires_grad
    w = torch.randn_like(t)
    got = torch.autograd.grad(pooled.square().sum() + (again * w).sum(), t)[0]
    ref = torch.autograd.grad(plain.square().sum() + (again_plain * w).sum(), t)[0]
    assert torch.equal(got, ref)
    n, c, h, w = t.shape
    rows = t.detach().permute(0, 2, 3, 1).reshape(n, h * w, c)
    torch.library.opcheck(op.default, (rows, dtype))
    with pytest.raises(ValueError, match="low_dtype takes chain"):
        pool(t, low_dtype=dtype, **kwargs)
    with pytest.raises(ValueError, match="low_dtype must be"):
        op(rows, bad_dtype)


@contextlib.contextmanager
def recorded_launches():
    """{kernel name ("op_file._kernel"): [launch kwargs, with its grid under "grid"]} of the
    Triton launches inside the block (they still run)."""
    from hifuse_kernels import _triton

    launches: dict[str, list] = {}
    wrap = _triton.wrap_triton

    def recording(kernel):
        wrapped = wrap(kernel)

        class _Launch:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    name = f"{kernel.fn.__module__.split('.')[-1]}.{kernel.fn.__name__}"
                    launches.setdefault(name, []).append({**kwargs, "grid": grid})
                    return wrapped[grid](*args, **kwargs)

                return launch

        return _Launch()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_triton, "wrap_triton", recording)
        yield launches
