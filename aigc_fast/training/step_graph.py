"""The whole training step in one CUDA graph (``--cuda-graph``): both forwards, both backwards and
both Adam updates, captured once and replayed, so a launch-bound step (a DCGAN at 32 px, batch 64:
a hundred-odd kernels of a few microseconds) costs one graph launch.

Captured with ``torch.cuda.CUDAGraph`` directly rather than
``torch.compile(mode="reduce-overhead")``: the graph replays exactly the kernels the uncaptured step
launches, in the same order, so its results are bitwise those of the step without the graph; nothing
is compiled; and the optimiser steps, which torch.compile cannot put in one graph with the forward
and backward (PyTorch breaks the graph at ``Optimizer.zero_grad``, ``Tensor.backward`` and inside
``Optimizer.step``), are inside it. The step must not synchronise with the host (an ``.item()``
raises during capture): our ops and ``train_step`` do not; fp16's GradScaler does, so fp16 runs
without the graph.
"""
import torch


def graph_unavailable(backend, device, precision, world_size):
    """Why the step of this run cannot be captured (None when it can)."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, got {device.type}"
    if backend != "fused":
        return f"the step is captured for --backend fused only, got {backend}"
    if precision == "fp16":
        return "fp16's gradient scaler reads its overflow flag on the host at every step"
    if world_size > 1:
        return "the step of a multi-process (torchrun) run synchronises across processes"
    return None


def set_capturable(optimizer, capturable):
    """Make Adam's updates capturable in a graph (``capturable=True``: the step count is a float32
    tensor beside the parameters and nothing is read on the host), or not. A checkpoint brings its
    own setting with its optimiser state; this puts the run's back. Runs once, at set-up."""
    for group in optimizer.param_groups:
        group["capturable"] = capturable
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state:
                step = state["step"]
                state["step"] = (step.to(p.device, torch.float32) if capturable
                                 else step.to("cpu", torch.float32))


class GraphedStep:
    """``step(*inputs)`` (a dict of 0-dim tensors, as :func:`aigc_fast.train.train_step` returns)
    captured in a CUDA graph after ``warmup`` uncaptured calls (on a side stream, as capture
    requires: they fill Triton's compile caches and Adam's state). Each call then copies every
    input tensor (the real batch, the noise and, conditional, the real and fake labels) into the
    graph's static input buffers and replays it; the returned tensors are the graph's static
    outputs, overwritten by the next call. A call whose inputs have another count, shape or dtype
    runs uncaptured."""

    def __init__(self, step, warmup=1):
        self.step, self.warmup = step, warmup
        self.graph = self.static_inputs = self.static_outputs = None
        self.calls = 0

    def __call__(self, *inputs):
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            return self._side_stream(inputs)
        if self.graph is None:
            self._capture(inputs)
        elif len(inputs) != len(self.static_inputs) or not all(
                _same_layout(a, b) for a, b in zip(self.static_inputs, inputs)):
            return self._side_stream(inputs)
        else:
            for static, value in zip(self.static_inputs, inputs):
                static.copy_(value)
        self.graph.replay()
        return self.static_outputs

    def _side_stream(self, inputs):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = self.step(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    def _capture(self, inputs):
        """Record the step on static copies of this call's inputs (capture runs nothing: the replay
        that follows performs this call's step)."""
        self.static_inputs = tuple(x.clone() for x in inputs)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_outputs = self.step(*self.static_inputs)


def _same_layout(static, value):
    return (static.shape, static.dtype,
            static.stride()) == (value.shape, value.dtype, value.stride())
