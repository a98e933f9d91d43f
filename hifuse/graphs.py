"""A whole training step (forward, loss, backward, optimizer step) replayed as one CUDA graph.

An eager step pays host work for every launch: Python, dispatch, autograd, the Triton
launcher. Replaying a captured graph costs one launch, so the step takes its kernels' time
(on an H200 the fused step at batch 32 spends about 4x its GPU time on the host). The graph
is recorded once, in seconds, where ``torch.compile`` takes minutes.

What a graph needs, and what ``TrainStep`` does about it:
- static shapes: the graph is recorded for the first batch's shape, dtype and strides; a
  batch of another shape (a last partial batch) runs as the plain step, uncaptured, with the
  same result (logged once per shape), or raises with ``strict=True``;
- static memory: inputs are copied into buffers the graph reads; the returned loss and
  output are the graph's own buffers, overwritten by the next step (clone to keep them);
- no host work inside the step: an Adam or AdamW with ``capturable=True`` and the learning
  rate as a tensor on the device (a scheduler then fills it in place); ``make_capturable``
  converts one. bf16 or fp32 only: fp16 needs a GradScaler, which reads its scale on the host;
- warm-up before recording (kernels compiled, lazy state made, per-shape decisions taken):
  the warm-up steps change weights, statistics and optimizer state, so all of it, and the
  random state, is put back before recording; the first replay is the first real step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("hifuse")

WARMUP = 3  # steps run before recording (the CUDA graph docs' recommendation)


def graph_problems(model: nn.Module, optimizer: torch.optim.Optimizer, amp: torch.dtype | None) -> list[str]:
    """Why ``model``'s training step with ``optimizer`` under autocast ``amp`` cannot be
    recorded as a CUDA graph (empty when it can)."""
    problems = []
    params = list(model.parameters())
    devices = {p.device for p in params}
    if len(devices) != 1:
        problems.append(f"the model's parameters are on {len(devices)} devices ({sorted(map(str, devices))}); one is needed")
    device = params[0].device if params else torch.device("cpu")
    if device.type != "cuda":
        problems.append(f"CUDA graphs need the model on a CUDA device (it is on {device})")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        problems.append("DistributedDataParallel: its gradient reduction is not recorded here; train on one process")
    if amp is not None and amp not in (torch.bfloat16, torch.float32):
        problems.append(f"autocast {amp}: float16 needs a GradScaler, which reads its scale on the host; use bfloat16")
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        problems.append(f"{type(optimizer).__name__}: only Adam and AdamW (capturable=True) are supported")
        return problems
    for i, group in enumerate(optimizer.param_groups):
        if not group.get("capturable", False):
            problems.append(f"optimizer group {i} has capturable=False (hifuse.graphs.make_capturable(optimizer) "
                            "converts it; or build it with capturable=True and lr=torch.tensor(lr, device=...))")
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor) or lr.device != device:
            where = f"a tensor on {lr.device}" if isinstance(lr, torch.Tensor) else "a Python number"
            problems.append(f"optimizer group {i}'s lr is {where}: a graph keeps a number as it was when recorded, so "
                            f"a schedule would not reach it; it must be a tensor on {device} (make_capturable converts it)")
    return problems


def make_capturable(optimizer: torch.optim.Optimizer, scheduler=None) -> torch.optim.Optimizer:
    """Turns an Adam or AdamW into one a CUDA graph can record, in place: ``capturable=True``,
    each group's lr (and ``initial_lr``, which schedulers read) a tensor on its parameters'
    device, step counts on that device; a ``scheduler``'s base learning rates too (it fills
    the lr tensors in place, with no host sync). Call it before building a scheduler, or
    after ``load_state_dict`` (which brings back the saved flags) with the scheduler. Returns
    the optimizer."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(f"make_capturable takes an Adam or AdamW, not {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        device = group["params"][0].device
        group["capturable"] = True
        for key in ("lr", "initial_lr"):
            if key in group:
                group[key] = _device_scalar(group[key], device)
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device)
    if scheduler is not None:
        device = optimizer.param_groups[0]["params"][0].device
        scheduler.base_lrs = [_device_scalar(lr, device) for lr in scheduler.base_lrs]
    return optimizer


def make_uncapturable(optimizer: torch.optim.Optimizer, scheduler=None) -> torch.optim.Optimizer:
    """The reverse of ``make_capturable``, for an optimizer saved from a graphed run and resumed
    without graphs: ``capturable=False``, learning rates (the scheduler's too) Python numbers."""
    for group in optimizer.param_groups:
        group["capturable"] = False
        for key in ("lr", "initial_lr"):
            if isinstance(group.get(key), torch.Tensor):
                group[key] = float(group[key])
        if not group.get("fused"):
            for p in group["params"]:
                state = optimizer.state.get(p)
                if state and isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].detach().to("cpu", torch.float32)
    if scheduler is not None:
        scheduler.base_lrs = [float(lr) for lr in scheduler.base_lrs]
    return optimizer


def _device_scalar(value, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, torch.float32).reshape(())
    return torch.tensor(float(value), dtype=torch.float32, device=device)


class CudaGraph:
    """Records a function once; ``replay`` runs what it recorded and returns its outputs (the
    same tensors every time)."""

    def capture(self, fn: Callable[[], tuple]) -> None:
        self.graph = torch.cuda.CUDAGraph()
        # thread-local: the data loader's pin-memory thread may call CUDA during the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = fn()

    def replay(self) -> tuple:
        self.graph.replay()
        return self.outputs


_Graph = CudaGraph  # tests on CPU replace it with a stand-in that reruns the function


def warm_up(fn: Callable[[], object], calls: int, device: torch.device) -> None:
    """``fn()`` ``calls`` times before a capture (kernels compiled, lazy state and per-shape
    decisions made), on a side stream as the CUDA graph docs ask; on a CPU as it stands."""
    if device.type != "cuda":
        for _ in range(calls):
            fn()
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)


class _Snapshot:
    """Weights, buffers, optimizer state and random state, to be put back in place (the graph
    keeps the tensors' addresses, so nothing may be replaced)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.optimizer, self.device = optimizer, device
        with torch.no_grad():
            self.tensors = {id(t): (t, t.detach().clone()) for t in [*model.parameters(), *model.buffers()]}
            self.state = {p: {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                          for p, s in optimizer.state.items()}
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @torch.no_grad()
    def restore(self) -> None:
        for t, saved in self.tensors.values():
            t.copy_(saved)
        for p, state in self.optimizer.state.items():
            saved = self.state.get(p)
            for k, v in state.items():
                if not isinstance(v, torch.Tensor):
                    continue
                if saved is None:
                    v.zero_()  # made by the warm-up: Adam's fresh state is zeros (moments, step)
                else:
                    v.copy_(saved[k])
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)


def _signature(*tensors: torch.Tensor) -> tuple:
    return tuple((t.shape, t.dtype, t.stride()) for t in tensors)


class TrainStep:
    """One training step, ``loss, output = step(inputs, target)``: forward under autocast,
    ``loss_fn(output, target)``, backward, ``optimizer.step()``; recorded as one CUDA graph on
    the first call and replayed after (``cuda_graph=True``), or run as it stands.

    Args:
        model: the model, its parameters on one device (for graphs, a CUDA device).
        optimizer: its optimizer; for graphs an Adam or AdamW with ``capturable=True`` and
            tensor learning rates (``make_capturable``). The step calls its ``step()``; call
            your scheduler's ``step()`` after each call as usual.
        loss_fn: ``loss_fn(output, target)``, a scalar (default cross-entropy).
        amp: autocast dtype (``torch.bfloat16``), or None for none.
        cuda_graph: record the step as a CUDA graph.
        strict: raise on a batch whose shape, dtype or strides differ from the recorded one,
            or on a change of training mode, instead of running it uncaptured.
        warmup: steps run before recording (undone before the first real step).

    The returned loss and output are detached; under a graph they are its buffers, valid
    until the next call. The gradients stay in ``p.grad`` as after a plain step.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy, *,
                 amp: torch.dtype | None = None, cuda_graph: bool = True, strict: bool = False,
                 warmup: int = WARMUP) -> None:
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.amp, self.cuda_graph, self.strict, self.warmup = amp, cuda_graph, strict, warmup
        self.device = next(model.parameters()).device
        if cuda_graph:
            problems = graph_problems(model, optimizer, amp)
            if problems:
                raise ValueError("this training step cannot be recorded as a CUDA graph: " + "; ".join(problems))
            if warmup < 1:
                raise ValueError(f"warmup must be at least 1 (kernels compile and lazy state is made there), not {warmup}")
        self._graph = None
        self._key = None
        self._unrecorded: set = set()

    def _forward_backward(self, inputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            output = self.model(inputs)
            loss = self.loss_fn(output, target)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), output.detach()

    def __call__(self, inputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(inputs, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError(f"TrainStep takes (inputs, target) tensors, not ({type(inputs).__name__}, {type(target).__name__})")
        if not self.cuda_graph:
            return self._forward_backward(inputs.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True))
        key = (_signature(inputs, target), self.model.training)
        if self._graph is None:
            self._record(inputs, target)
            self._key = key
        elif key != self._key:
            return self._unrecorded_step(inputs, target, key)
        self._inputs.copy_(inputs, non_blocking=True)
        self._target.copy_(target, non_blocking=True)
        return self._graph.replay()

    def _record(self, inputs: torch.Tensor, target: torch.Tensor) -> None:
        # buffers of the batch's own layout (channels-last stays channels-last) on the model's device
        self._inputs = torch.empty_like(inputs, device=self.device)
        self._target = torch.empty_like(target, device=self.device)
        self._inputs.copy_(inputs)
        self._target.copy_(target)
        snapshot = _Snapshot(self.model, self.optimizer, self.device)
        warm_up(lambda: self._forward_backward(self._inputs, self._target), self.warmup, self.device)
        snapshot.restore()
        del snapshot
        self.optimizer.zero_grad(set_to_none=True)
        graph = _Graph()
        try:
            graph.capture(lambda: self._forward_backward(self._inputs, self._target))
        except Exception as e:
            raise RuntimeError(f"recording the training step as a CUDA graph failed ({type(e).__name__}: {e}); "
                               "TrainStep(..., cuda_graph=False) runs it uncaptured") from e
        self._graph = graph
        # the graph writes these gradient tensors; a step run outside it must leave p.grad on them
        self._grads = {p: p.grad for p in self.model.parameters() if p.grad is not None}

    def _unrecorded_step(self, inputs, target, key) -> tuple[torch.Tensor, torch.Tensor]:
        shape, training = key
        recorded_shape, recorded_training = self._key
        what = (f"training mode {training} (recorded in {recorded_training})" if training != recorded_training else
                f"inputs {[tuple(s) for s, _, _ in shape]} {[str(d) for _, d, _ in shape]} (recorded for "
                f"{[tuple(s) for s, _, _ in recorded_shape]} {[str(d) for _, d, _ in recorded_shape]}, or other strides)")
        if self.strict:
            raise ValueError(f"TrainStep(strict=True): a step with {what} cannot replay the recorded CUDA graph")
        if key not in self._unrecorded:
            self._unrecorded.add(key)
            logger.info("hifuse TrainStep: a step with %s runs uncaptured (same result, host-bound speed)", what)
        result = self._forward_backward(inputs.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True))
        with torch.no_grad():
            for p, static in self._grads.items():
                if p.grad is not None and p.grad is not static:
                    static.copy_(p.grad)
                    p.grad = static
        return result

