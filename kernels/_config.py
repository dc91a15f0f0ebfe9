"""Launch settings shared by the kernel modules: tf32 policy, block sizes, the GPU to fill."""
import functools

import torch
import triton

from . import META_LAUNCHES


def dot_precision(dtype: torch.dtype, device: torch.device):
    """``tl.dot``'s input_precision. Float32 convolutions follow PyTorch's own switch,
    ``torch.backends.cudnn.allow_tf32`` (True by default): when it is off, or on the CPU (the
    interpreter), "ieee" (exact float32 products); otherwise None, the target's default (tf32 on
    NVIDIA), which is also what float16/bfloat16 operands take (the option only concerns float32).
    Meta tensors, which the GPU tools record launches on, stand for CUDA ones."""
    if dtype == torch.float32 and (device.type not in ("cuda", "meta")
                                   or not torch.backends.cudnn.allow_tf32):
        return "ieee"
    return None


def pow2_block(n: int, lo: int, hi: int) -> int:
    """The smallest power of two >= n, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def compute_capability(device: torch.device) -> int:
    """The target's compute capability as one number (90: sm_90): the recorded GPU's for meta
    tensors; the CUDA device's; sm_90's under the interpreter, which has none."""
    if device.type == "meta":
        return META_LAUNCHES.capability
    if device.type != "cuda":
        return 90
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_capability(index)


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
