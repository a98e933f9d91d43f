"""hifuse.TrainStep: the training step recorded as one CUDA graph.

On a CPU everything but the recording is checked: a stand-in graph that reruns the recorded
function each replay shows that the warm-up is undone (weights, statistics, optimizer state,
random state), that replays and the steps of other shapes give the plain steps' results
bitwise, and that what cannot be recorded is refused with its reason. On a GPU the real graph's
replays are checked against the plain step.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

import hifuse
from hifuse import graphs
from hifuse.cli.bench import no_decay_groups


class Rerun:
    """A graph that runs the recorded function again on each replay (what a replay does,
    without the device)."""

    def capture(self, fn):
        self.fn = fn

    def replay(self):
        return self.fn()


def _model(drop_path=0.1):
    torch.manual_seed(0)
    return hifuse.create_model("hifuse_tiny", num_classes=3, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128),
                               num_heads=(1, 1, 2, 2), drop_path_rate=drop_path)


def _batches(sizes, side=32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, side, side, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]


def _optimizer(model):
    opt = torch.optim.AdamW(no_decay_groups(model, 0.05), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
    return opt, sched


def _state(model, opt):
    out = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    out.update({f"grad.{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for i, p in enumerate(model.parameters()):
        for k, v in opt.state.get(p, {}).items():
            out[f"opt.{i}.{k}"] = v.clone()
    return out


def _plain_run(model, batches):
    torch.manual_seed(5)  # drop path's draws
    opt, sched = _optimizer(model)
    results = []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        opt.step()
        sched.step()
        results.append((loss.detach().clone(), out.detach().clone()))
    return results, _state(model, opt)


@pytest.fixture
def rerun_graph(monkeypatch):
    """TrainStep(cuda_graph=True) on the CPU, with the stand-in graph (a CPU optimizer cannot
    be capturable, so the refusals are checked apart)."""
    monkeypatch.setattr(graphs, "_Graph", Rerun)
    monkeypatch.setattr(graphs, "graph_problems", lambda *args: [])


def test_graphed_step_equals_the_plain_step(rerun_graph, caplog):
    """Four steps (the third a partial batch, which runs uncaptured) through TrainStep with a
    scheduler: losses, outputs, weights, BatchNorm statistics, gradients and AdamW state equal
    the plain loop's bitwise. Drop path is on, so the random state must be put back after
    the warm-up too."""
    batches = _batches([4, 4, 3, 4])
    model = _model()
    ref_results, ref_state = _plain_run(copy.deepcopy(model), batches)

    torch.manual_seed(5)
    opt, sched = _optimizer(model)
    step = hifuse.TrainStep(model, opt, F.cross_entropy)
    results = []
    with caplog.at_level(logging.INFO, logger="hifuse"):
        for x, y in batches:
            loss, out = step(x, y)
            sched.step()
            results.append((loss.clone(), out.clone()))
    for (loss, out), (ref_loss, ref_out) in zip(results, ref_results):
        assert torch.equal(loss, ref_loss) and torch.equal(out, ref_out)
    state = _state(model, opt)
    assert state.keys() == ref_state.keys()
    for k, v in ref_state.items():
        assert torch.equal(state[k], v), k
    assert sum("runs uncaptured" in r.getMessage() for r in caplog.records) == 1


def test_strict_refuses_another_shape(rerun_graph):
    model = _model(drop_path=0.0)
    opt, _ = _optimizer(model)
    step = hifuse.TrainStep(model, opt, strict=True)
    (x, y), (x2, y2) = _batches([4, 3])
    step(x, y)
    with pytest.raises(ValueError, match=r"strict=True.*\(3, 3, 32, 32\)"):
        step(x2, y2)
    model.eval()
    with pytest.raises(ValueError, match="training mode False"):
        step(x, y)


def test_plain_step_without_graph():
    """cuda_graph=False is the plain step, on any device."""
    batches = _batches([2, 2])
    model = _model(drop_path=0.0)
    ref_results, ref_state = _plain_run(copy.deepcopy(model), batches)
    opt, sched = _optimizer(model)
    step = hifuse.TrainStep(model, opt, cuda_graph=False)
    for (x, y), (ref_loss, _) in zip(batches, ref_results):
        loss, _ = step(x, y)
        sched.step()
        assert torch.equal(loss, ref_loss)
    state = _state(model, opt)
    assert all(torch.equal(state[k], v) for k, v in ref_state.items())


def test_fused_graphed_step_equals_the_plain_fused_step(rerun_graph):
    """The same with every part fused (the Triton kernels in the interpreter on a CPU)."""
    from helpers import triton_device_or_skip

    triton_device_or_skip()
    batches = _batches([2, 2])
    model = _model(drop_path=0.0)
    with hifuse.use_fused():
        ref_results, ref_state = _plain_run(copy.deepcopy(model), batches)
        opt, sched = _optimizer(model)
        step = hifuse.TrainStep(model, opt, warmup=1)
        for (x, y), (ref_loss, ref_out) in zip(batches, ref_results):
            loss, out = step(x, y)
            sched.step()
            assert torch.equal(loss, ref_loss) and torch.equal(out, ref_out)
    state = _state(model, opt)
    assert all(torch.equal(state[k], v) for k, v in ref_state.items())


def test_what_cannot_be_recorded_is_refused():
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    problems = graphs.graph_problems(model, sgd, torch.float16)
    text = "; ".join(problems)
    assert "CUDA device (it is on cpu)" in text and "float16 needs a GradScaler" in text and "SGD" in text
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    text = "; ".join(graphs.graph_problems(model, adamw, torch.bfloat16))
    assert "capturable=False" in text and "lr is a Python number" in text
    graphs.make_capturable(adamw)
    assert graphs.graph_problems(model, adamw, torch.bfloat16) == ["CUDA graphs need the model on a CUDA device (it is on cpu)"]
    with pytest.raises(ValueError, match="cannot be recorded as a CUDA graph: CUDA graphs need the model on a CUDA device"):
        hifuse.TrainStep(model, adamw)
    with pytest.raises(TypeError, match="Adam or AdamW"):
        graphs.make_capturable(sgd)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_make_capturable_keeps_a_schedule_working():
    """After make_capturable the learning rate is a tensor a scheduler fills in place (the
    graph keeps reading that tensor); make_uncapturable goes back, and a state saved either
    way loads into the other."""
    model = _model(drop_path=0.0)
    opt = graphs.make_capturable(torch.optim.AdamW(model.parameters(), lr=1e-3))
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and opt.param_groups[0]["capturable"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 ** i)
    sched.step()
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(5e-4)
    saved = opt.state_dict()
    plain = graphs.make_uncapturable(torch.optim.AdamW(model.parameters(), lr=1e-3))
    plain.load_state_dict(saved)
    graphs.make_uncapturable(plain)
    assert plain.param_groups[0]["lr"] == pytest.approx(5e-4) and not plain.param_groups[0]["capturable"]
    (x, y), = _batches([2])
    F.cross_entropy(model(x), y).backward()
    plain.step()  # a float lr, foreach: runs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_graph_replays_equal_the_plain_step(fused):
    """On a GPU: HiFuse-Tiny at 64x64 in bf16, five steps recorded and replayed against five
    plain steps (the fourth a partial batch) with a capturable fused AdamW and a schedule:
    equal losses and weights (bitwise where every kernel is deterministic: cuBLAS and cuDNN
    pick the same algorithms for the same shapes on one stream)."""
    torch.manual_seed(0)
    model = hifuse.create_model("hifuse_tiny", num_classes=3).cuda()
    reference = copy.deepcopy(model)
    batches = [(x.cuda(), y.cuda()) for x, y in _batches([4, 4, 4, 3, 4], side=64)]

    def optimizer(m):
        opt = torch.optim.AdamW(no_decay_groups(m, 0.05), lr=torch.tensor(1e-3, device="cuda"),
                                fused=True, capturable=True)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))

    # cuDNN may pick non-deterministic backward algorithms; replays are compared bitwise
    with hifuse.use_fused(fused), torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        opt, sched = optimizer(reference)
        plain = hifuse.TrainStep(reference, opt, amp=torch.bfloat16, cuda_graph=False)
        ref_losses = []
        for x, y in batches:
            ref_losses.append(plain(x, y)[0].clone())
            sched.step()
        opt, sched = optimizer(model)
        step = hifuse.TrainStep(model, opt, amp=torch.bfloat16)
        losses = []
        for x, y in batches:
            losses.append(step(x, y)[0].clone())
            sched.step()
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=0, atol=0)
    for (k, v), r in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(v, r, rtol=0, atol=0, msg=k)
