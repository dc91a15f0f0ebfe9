"""The benchmark suite (``pytest --benchmark``) and the GPU report (``python
benchmarks/gpu_report.py``).

What is measured and how lives in one place each, shared by both front ends: :mod:`.cost` (FLOPs and
minimum bytes), :mod:`.cases` (the workloads), :mod:`.providers` (eager, channels_last, compile,
fused) and :mod:`.measure` (timing, memory, launches, environment).
"""
