"""Two tiny kernels for tests/test_gpu_compile_check.py, imported only by its non-interpreted
subprocess: the same store of NaN, once through a ``tl.constexpr(nan)`` global (which Triton's
launch-time check rejects: nan != nan) and once as a literal."""
import triton
import triton.language as tl

NAN = tl.constexpr(float("nan"))


@triton.jit
def nan_global_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(x_ptr + offs, tl.where(x > 0, x, NAN))


@triton.jit
def nan_literal_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(x_ptr + offs, tl.where(x > 0, x, float("nan")))
