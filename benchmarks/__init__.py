"""Benchmarks of gradient_ascent_jax against Optax, PyTorch and a hand-fused floor.

Each module is one command, run from the repository root::

  python -m benchmarks.step_time          # step time vs parameter count
  python -m benchmarks.compile_time       # lower + compile time vs leaf count
  python -m benchmarks.logging_overhead   # logging every 10 steps vs off
  python -m benchmarks.memory             # compiled peak memory, state bytes
  python -m benchmarks.plot               # log-log PNG from step_time --json

Every command takes ``--smoke`` (smallest size, few repeats) and prints a
Markdown table; the results are in BENCHMARKS.md.
"""
