"""hifuse_kernels.weight_casts: the weights a forward casts for its GEMMs are cast together at
the start of the next forward, hold the values of that moment, and change no result."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import hifuse
from hifuse import config
from hifuse_kernels import reference, weight_casts

from helpers import triton_device_or_skip


class Owner:
    pass


def test_second_forward_reads_the_batch():
    w = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(torch.randn(5))
    made = torch.randn(4)  # not a parameter: made anew each forward
    owner = Owner()
    with weight_casts.batch(owner, torch.bfloat16):
        first = weight_casts.cast(w, torch.bfloat16)
        weight_casts.cast(made, torch.bfloat16)
        weight_casts.cast(b, torch.bfloat16)
    dtype, plan = owner._hifuse_cast_plan
    assert dtype == torch.bfloat16 and [p is q for p, q in zip(plan, (w, b))] == [True, True] and len(plan) == 2
    with torch.no_grad():
        w.add_(1.0)  # an optimizer step between forwards
    with weight_casts.batch(owner, torch.bfloat16):
        active = weight_casts._state.active
        assert set(active[1]) == {id(w), id(b)}  # cast on entry, together
        second = weight_casts.cast(w, torch.bfloat16)
        batched = active[1][id(w)][1]
        assert second.data_ptr() == batched.data_ptr() and second.shape == batched.shape
        assert weight_casts.cast(w, torch.bfloat16).data_ptr() == second.data_ptr()  # one cast for every reader
        assert weight_casts.cast(w, torch.float16).dtype == torch.float16  # another dtype: cast there
    torch.testing.assert_close(second, w.detach().to(torch.bfloat16), rtol=0, atol=0)
    assert not torch.equal(first, second) and not second.requires_grad
    assert weight_casts._state.active is None


def test_whole_views_of_parameters_share_the_batch():
    """A 1x1 convolution's weight flattened for its GEMM is the parameter's cast, viewed; a part
    of a parameter is cast where it is asked for."""
    w = torch.nn.Parameter(torch.randn(6, 4, 1, 1))
    owner = Owner()
    with weight_casts.batch(owner, torch.bfloat16):
        weight_casts.cast(w.flatten(1), torch.bfloat16)
    assert [p is w for p in owner._hifuse_cast_plan[1]] == [True]
    with weight_casts.batch(owner, torch.bfloat16):
        batched = weight_casts._state.active[1][id(w)][1]
        flat = weight_casts.cast(w.flatten(1), torch.bfloat16)
        part = weight_casts.cast(w[1:], torch.bfloat16)
    assert flat.shape == (6, 4) and flat.data_ptr() == batched.data_ptr()
    assert part.data_ptr() != batched.data_ptr() and torch.equal(part, w.detach()[1:].to(torch.bfloat16))
    # a channels-last 3x3 weight permuted to its memory order (a patch convolution's GEMM
    # rows), and its transpose: the batch's cast has the parameter's strides, so it is the same
    # view of that cast, with the same values
    k = torch.nn.Parameter(torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last))
    owner = Owner()
    for _ in range(2):  # the first forward asks for it, the second reads the batch
        with weight_casts.batch(owner, torch.bfloat16):
            rows = weight_casts.cast(k.permute(0, 2, 3, 1).reshape(4, 27), torch.bfloat16)
            turned = weight_casts.cast(k.permute(0, 2, 3, 1).reshape(4, 27).t(), torch.bfloat16)
            batched = weight_casts._state.active[1].get(id(k), (None, rows))[1]
    assert rows.data_ptr() == turned.data_ptr() == batched.data_ptr() and batched.stride() == k.stride()
    assert torch.equal(rows, k.detach().permute(0, 2, 3, 1).reshape(4, 27).to(torch.bfloat16))
    assert torch.equal(turned, rows.t())


def test_outside_a_batch_and_while_tracing_casts_in_place(monkeypatch):
    w = torch.nn.Parameter(torch.randn(3))
    assert weight_casts.cast(w, torch.float32) is w
    assert weight_casts.cast(w, torch.bfloat16).dtype == torch.bfloat16
    owner = Owner()
    with weight_casts.batch(owner, torch.bfloat16):
        weight_casts.cast(w, torch.bfloat16)
    monkeypatch.setattr(reference, "_tracing", lambda: True)
    with weight_casts.batch(owner, torch.bfloat16):
        assert weight_casts._state.active is None  # Inductor fuses the casts; nothing batched
        assert weight_casts.cast(w, torch.bfloat16).dtype == torch.bfloat16


def test_nested_batches_keep_the_outer_one():
    w = torch.nn.Parameter(torch.randn(3))
    outer, inner = Owner(), Owner()
    with weight_casts.batch(outer, torch.bfloat16):
        state = weight_casts._state.active
        with weight_casts.batch(inner, torch.bfloat16):
            assert weight_casts._state.active is state
            weight_casts.cast(w, torch.bfloat16)
        assert weight_casts._state.active is state
    assert "_hifuse_cast_plan" not in vars(inner) and len(outer._hifuse_cast_plan[1]) == 1


@triton_device_or_skip()
def test_fused_steps_are_the_same_with_and_without_the_batch(monkeypatch):
    """Two bf16 training steps, the second reading the batched casts: losses, gradients and
    weights bitwise those of the same steps casting each weight where it is used."""
    from hifuse.cli.bench import no_decay_groups

    def run(batched):
        if not batched:
            monkeypatch.setattr(config, "_scope", [])
        torch.manual_seed(0)
        model = hifuse.create_model("hifuse_tiny", num_classes=3, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128),
                                    num_heads=(1, 1, 2, 2)).to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(no_decay_groups(model, 0.05), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 3, 64, 64, generator=g).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 3, (2,), generator=g)
        losses = []
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            with hifuse.use_fused(True), torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            opt.step()
            losses.append(loss.detach())
        monkeypatch.undo()
        return model, losses, grads

    batched, losses, grads = run(True)
    plan = batched._hifuse_cast_plan[1]
    assert len(plan) > 10 and all(isinstance(p, torch.nn.Parameter) for p in plan)
    plain, losses_ref, grads_ref = run(False)
    assert "_hifuse_cast_plan" not in vars(plain)
    for a, b in zip([*losses, *grads, *batched.parameters()], [*losses_ref, *grads_ref, *plain.parameters()]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
