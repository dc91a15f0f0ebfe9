"""Launch settings shared by the kernel modules: tf32 policy, autotune config lists, block sizes."""
import functools

import torch
import triton

from . import META_LAUNCHES, interpreting


def dot_precision(dtype: torch.dtype, device: torch.device):
    """``tl.dot``'s input_precision. Float32 convolutions follow PyTorch's own switch,
    ``torch.backends.cudnn.allow_tf32`` (True by default): when it is off, or off CUDA, "ieee" (exact
    float32 products); otherwise None, the target's default (tf32 on NVIDIA), which is also what
    float16/bfloat16 operands take (the option only concerns float32)."""
    if dtype == torch.float32 and (device.type != "cuda" or not torch.backends.cudnn.allow_tf32):
        return "ieee"
    return None


def autotune_configs(cuda_configs, interpreter_config):
    """The configs to autotune over: all of them on a GPU, one under the interpreter, where timing
    means nothing and each extra config would only multiply the test time."""
    return [interpreter_config] if interpreting() else cuda_configs


def gemm_tuning(block_names, tensor_cores, exact, interpreter_blocks):
    """``triton.autotune`` keywords ``configs`` and ``prune_configs_by`` for a GEMM kernel.

    Configs are ``(*block sizes, num_warps, num_stages)``. Launches whose products run on tensor
    cores (tf32, float16, bfloat16) try ``tensor_cores``; those with exact float32 products
    (DOT_PRECISION="ieee": FMA, more live registers) try ``exact``. Every listed config builds
    without spills for its launches on sm_90 and sm_80 with Triton 3.6 and 3.9: the GPU compile
    check (benchmarks/gpu_compile_check.py) says so, and fails when one does not."""
    specs = list(dict.fromkeys(tensor_cores + exact))
    spec_of = lambda c: (*(c.kwargs[n] for n in block_names), c.num_warps, c.num_stages)  # noqa: E731
    groups = {"ieee": set(exact), None: set(tensor_cores)}

    def prune(configs, named_args, **kwargs):
        """By value, not identity: torch's user-defined-Triton path prunes copies of the configs.
        Configs from no group (the interpreter's one) pass."""
        wanted = groups["ieee" if kwargs.get("DOT_PRECISION") == "ieee" else None]
        kept = [c for c in configs if spec_of(c) in wanted]
        return kept or configs

    interpreter = triton.Config(dict(zip(block_names, interpreter_blocks)), num_warps=4,
                                num_stages=1)
    configs = [triton.Config(dict(zip(block_names, s[:-2])), num_warps=s[-2], num_stages=s[-1])
               for s in specs]
    return {"configs": autotune_configs(configs, interpreter),
            "prune_configs_by": {"early_config_prune": prune}}


def pow2_block(n: int, lo: int, hi: int) -> int:
    """The smallest power of two >= n, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors to fill (a fixed 8 under the interpreter, so results do not depend
    on the host; the recorded GPU's for the compile check's meta tensors); split-K factors are
    derived from it, so they are fixed per machine."""
    if device.type == "meta":
        return META_LAUNCHES.multiprocessors
    if device.type != "cuda":
        return 8
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
