"""Ops: one module per op. Each exposes one function with a torch reference that runs anywhere; CUDA fast
paths (Triton / fla) plug in behind the same signature."""
