"""Runtime of zipvl-compile: probe selection, budgets, sparse attention kernels, statistics.

Everything here is plain PyTorch that Inductor can trace, except the custom ops in
``sparse_attention`` (opaque to the compiler by design: they read the budget on the host).
"""
