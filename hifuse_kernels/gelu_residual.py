"""GELU and residual add in one pass: ``shortcut + gelu(y)`` (exact, erf GELU).

Eager writes gelu(y) and reads it back for the add: five passes over the activation
(read y, write g, read g, read shortcut, write out). One Triton kernel does it in three and
keeps nothing but y for backward, which is one more fused pass: grad_y = grad * gelu'(y);
the shortcut's gradient is the incoming gradient itself. The result dtype is
promote(y, shortcut), as in eager (under autocast: a bf16 y and an fp32 residual stream
give fp32).

Layers: reference, kernels, registered ops, autograd, functional entry point. Used by
the fused blocks' tails (``hifuse.fused``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _configs, _triton
from ._triton import tl, triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024

__all__ = ["gelu_residual", "gelu_residual_ref"]


def gelu_residual_ref(y: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    return shortcut + F.gelu(y)


if triton is not None:
    from ._triton import gelu, gelu_grad

    @_triton.kernel
    def _fwd_kernel(Y, S, OUT, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + offs, (s + gelu(y)).to(OUT.dtype.element_ty), mask=mask)

    @_triton.kernel
    def _bwd_kernel(G, Y, DY, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DY + offs, (g * gelu_grad(y)).to(DY.dtype.element_ty), mask=mask)




WARPS = 4  # Triton's default


def _launch(name: str, n: int, shape_class: str, device: torch.device) -> dict:
    """BLOCK and num_warps of an elementwise launch over n values: the GPU's, or the launch
    table's for this device and dtypes, or a wide one."""
    if _triton.wide():
        return dict(BLOCK=min(_triton.next_power_of_2(n), _triton.WIDE_VALUES), num_warps=WARPS)
    return _configs.launch_config(f"gelu_residual.{name}", shape_class, dict(BLOCK=BLOCK, num_warps=WARPS), device,
                                  lambda config: _configs.power_of_two_problem(config, "BLOCK", high=1 << 16))


@_triton.define_op("hifuse::gelu_residual", mutates_args=())
def _gelu_residual_op(y: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    out = torch.empty(y.shape, device=y.device, dtype=torch.promote_types(y.dtype, shortcut.dtype))
    n = y.numel()
    launch = _launch("forward", n, f"{_configs.dtype_name(y.dtype)}/{_configs.dtype_name(shortcut.dtype)}", y.device)
    _triton.wrap_triton(_fwd_kernel)[(triton.cdiv(n, launch["BLOCK"]),)](y, shortcut, out, n, **launch)
    return out


@_triton.define_op("hifuse::gelu_backward", mutates_args=())
def _gelu_backward_op(grad: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    dy = torch.empty_like(y)
    n = y.numel()
    launch = _launch("backward", n, f"{_configs.dtype_name(grad.dtype)}/{_configs.dtype_name(y.dtype)}", y.device)
    _triton.wrap_triton(_bwd_kernel)[(triton.cdiv(n, launch["BLOCK"]),)](grad, y, dy, n, **launch)
    return dy


@_gelu_residual_op.register_fake
def _(y, shortcut):
    return y.new_empty(y.shape, dtype=torch.promote_types(y.dtype, shortcut.dtype))


@_gelu_backward_op.register_fake
def _(grad, y):
    return torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    y, shortcut = inputs
    ctx.save_for_backward(y)
    ctx.shortcut_dtype = shortcut.dtype


def _backward(ctx, grad):
    (y,) = ctx.saved_tensors
    grad = grad.contiguous()
    return torch.ops.hifuse.gelu_backward(grad, y), grad.to(ctx.shortcut_dtype)


_gelu_residual_op.register_autograd(_backward, setup_context=_setup_context)


def unsupported_reason(y: torch.Tensor, shortcut: torch.Tensor) -> str | None:
    reason = _triton.unsupported_reason(y, shortcut)
    if reason is not None:
        return reason
    if y.dtype not in SUPPORTED_DTYPES or shortcut.dtype not in SUPPORTED_DTYPES:
        return f"dtypes {y.dtype} and {shortcut.dtype} are not supported"
    return None


def gelu_residual(y: torch.Tensor, shortcut: torch.Tensor, check: bool = True) -> torch.Tensor:
    """``shortcut + gelu(y)`` in one pass (same shapes; any strides). ``check`` False skips the
    argument checks, for callers that made them once already."""
    if check:
        if not isinstance(y, torch.Tensor) or not isinstance(shortcut, torch.Tensor):
            raise TypeError("gelu_residual: y and shortcut must be tensors")
        if y.shape != shortcut.shape:
            raise ValueError(f"gelu_residual: y {tuple(y.shape)} and shortcut {tuple(shortcut.shape)} differ")
        reason = unsupported_reason(y, shortcut)
        if reason is not None:
            raise RuntimeError(f"gelu_residual: {reason}")
    return torch.ops.hifuse.gelu_residual(y.contiguous(), shortcut.contiguous())
