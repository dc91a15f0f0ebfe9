"""Data-parallel training under torchrun: one process per device, DistributedDataParallel on G and
D.

Without torchrun (WORLD_SIZE unset or 1) :func:`init_world` returns a single-process
:class:`World` whose methods are identities and no process group exists, so the single-process
trainer is unchanged.

Under torchrun a run is defined by its *global* batch, world_size x --batch-size:

- data: every step takes the next global batch of one seeded permutation per epoch, and rank r
  takes rows [r*B, (r+1)*B) of it (:class:`aigc_fast.training.data.BatchOrder`); noise: every rank
  draws the same global (world_size*B, nz) block from the same generator and keeps the same rows
  (:meth:`World.shard`). So the ranks see distinct images and noise, W processes x B see exactly
  what one process x W*B sees, and the position after s steps depends on s alone: a checkpoint
  resumes under any world size that divides its global batch (:meth:`World.per_process_config`).
- BatchNorm statistics are per process (as in pytorch/examples) unless --sync-bn swaps in
  :class:`SyncBatchNorm2d`, which makes them those of the global batch.
- rank 0 alone writes; metrics are averaged over the ranks with one all-reduce per logging step.
- a signal (Ctrl-C, SIGTERM) to any rank, or a failed write on rank 0, stops every rank after the
  same step: they agree with one small all-reduce after each step that wrote files and about once a
  second of training otherwise, never every step (:class:`aigc_fast.training.loop.StopAgreement`).
- a process-group timeout, and a shutdown without barriers, so that a dead, stuck or interrupted
  rank ends every rank instead of hanging them.
"""
import datetime
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .cli import UsageError, resolve_device

DEFAULT_TIMEOUT_S = 300.0

# D runs forward on the real batch and on the fakes before one backward; DDP's default re-broadcast
# of rank 0's buffers (BatchNorm running statistics) before every forward then overwrites tensors
# that the first forward saved for backward (cuDNN's BatchNorm keeps the running statistics: an
# "inplace operation" error on CUDA, pytorch issues 22095, 110363, 175024). It would also replace
# each rank's statistics with rank 0's at every forward; they are per process on purpose (as in
# pytorch/examples), or global with --sync-bn. torch 2.13 deprecates
# broadcast_buffers for forward_sync_buffers, which also keeps the one sync at construction
# (harmless: every rank starts from the same seed or checkpoint).
_DDP_ARGS = inspect.signature(DistributedDataParallel).parameters
_NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS
                           else {"broadcast_buffers": False})


def _env_int(name):
    text = os.environ.get(name)
    try:
        return int(text)
    except (TypeError, ValueError):
        raise UsageError(f"environment variable {name}={text!r}: expected an integer, as torchrun "
                         "sets it (launch with: torchrun --nproc-per-node N -m aigc_fast.train "
                         "...)")


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank ``rank`` of ``world_size``, training on ``device``."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    backend: str = ""  # "nccl" or "gloo" under torchrun; "" for a single process

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        """Rank 0: the only process that prints and writes files."""
        return self.rank == 0

    def describe_batch(self, batch_size):
        if not self.enabled:
            return f"batch {batch_size}"
        return (f"batch {batch_size} per process x {self.world_size} processes = "
                f"{batch_size * self.world_size} global ({self.backend})")

    def per_process_config(self, saved, what):
        """A resumed run keeps its global batch: ``saved`` (a checkpoint's config) with batch_size
        = its global batch / this world size and world_size = this one."""
        global_batch = saved["batch_size"] * saved.get("world_size", 1)
        per_process, rest = divmod(global_batch, self.world_size)
        if rest:
            raise UsageError(f"{what}: its global batch of {global_batch} images does not split "
                             f"over {self.world_size} processes; expected a process count that "
                             f"divides {global_batch}")
        return {**saved, "batch_size": per_process, "world_size": self.world_size}

    def shard(self, rows):
        """This rank's rows [rank*B, (rank+1)*B) of a global draw of world_size*B rows."""
        per_process = len(rows) // self.world_size
        return rows[self.rank * per_process:(self.rank + 1) * per_process] if self.enabled else rows

    def mean(self, values):
        """The mean over the ranks of a tensor (one all-reduce); the tensor itself alone."""
        if not self.enabled:
            return values
        total = values.clone()
        dist.all_reduce(total)
        return total / self.world_size

    def max_over_ranks(self, values):
        """The element-wise maximum over the ranks of a few numbers (one all-reduce, one host
        sync): how the ranks agree whether and why to stop (:class:`~.loop.StopAgreement`).
        Alone: the numbers themselves."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def wrap(self, module):
        """DistributedDataParallel around ``module`` (plain, fused or compiled); ``module`` alone.

        Gradients are averaged over the ranks, so parameters and optimiser states stay bitwise
        identical on every rank. find_unused_parameters stays off: D's parameters are frozen
        (requires_grad False) during G's backward, so no hook of D's fires there and its reducer
        waits for nothing; every other backward reaches every parameter that needs a gradient.
        """
        if not self.enabled:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, **_NO_FORWARD_BUFFER_SYNC)

    def shutdown(self, clean):
        """Leave the process group. After a clean run the ranks meet at a barrier, then destroy the
        group: without the barrier a gloo rank that left while rank 0 was still writing its last
        samples and checkpoint sometimes aborted at exit (2 of 60 two-process CPU runs, measured).
        Every rank has finished, so none waits on one that is gone; a rank that fails meanwhile
        ends the job through torchrun or the collective timeout. After a failure there is no
        barrier: NCCL's communicators are aborted (they may hold collectives that will never
        complete), and a gloo group is left to close with the process."""
        if not self.enabled or not dist.is_initialized():
            return
        if clean:
            dist.barrier()
            dist.destroy_process_group()
        elif self.backend == "nccl":
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if abort is not None:
                abort()


def init_world(device_name, timeout_s=DEFAULT_TIMEOUT_S):
    """The :class:`World` of this process, and its process group when torchrun started it.

    Under torchrun (WORLD_SIZE > 1): device cuda:LOCAL_RANK with NCCL, or the CPU with gloo when
    --device cpu (or no GPU); collectives that wait longer than ``timeout_s`` for a peer fail.
    """
    world_size = _env_int("WORLD_SIZE") if "WORLD_SIZE" in os.environ else 1
    device = resolve_device(device_name)
    if world_size <= 1:
        return World(device)
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local_rank}: this node has {torch.cuda.device_count()} "
                             "CUDA devices; expected --nproc-per-node at most that (one process "
                             "per GPU)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    return World(device, rank, world_size, backend)


# --- --sync-bn ------------------------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of a sum over ranks is the sum over ranks."""

    @staticmethod
    def forward(ctx, tensor):
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad.contiguous())


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch over all ranks.

    torch.nn.SyncBatchNorm runs only on GPUs (DDP refuses it in CPU modules); this one runs on any
    device with two all-reduces of per-channel sums: the global mean, then the squared deviations
    from it (two passes: sum and sum-of-squares would cancel where |mean| >> std). The all-reduces
    are differentiable, so the backward sums each rank's gradient terms the same way. Outside
    training or without a process group it is BatchNorm2d; its state_dict is BatchNorm2d's.
    """

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels, dims = x.shape[1], (0, 2, 3)
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims),
                                              x.new_full((1,), x.numel() // channels)]))
        count = sums[channels]
        mean = sums[:channels] / count
        centred = x - mean.view(1, -1, 1, 1)
        var = _AllReduceSum.apply(centred.square().sum(dims)) / count  # biased: for normalising
        y = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * count / (count - 1))
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean, unbiased_var):
        self.num_batches_tracked.add_(1)
        # momentum None: cumulative average, as BatchNorm2d (a tensor factor: no host sync)
        factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
        self.running_mean.mul_(1 - factor).add_(mean * factor)
        self.running_var.mul_(1 - factor).add_(unbiased_var * factor)


def convert_sync_bn(module):
    """Swap every BatchNorm2d below ``module`` for :class:`SyncBatchNorm2d`, in place, sharing its
    parameters and buffers (so optimisers, state_dict keys and checkpoints are unchanged)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            for key, value in list(child._parameters.items()) + list(child._buffers.items()):
                setattr(sync, key, value)
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_sync_bn(child)
    return module
