"""Runtime of zipvl-compile: probe selection, budgets, sparse prefill kernels, the importance
hand-over, the mixed-precision KV storage and its decode attention kernels, statistics.

Everything here is plain PyTorch that Inductor can trace, except the custom ops (``zipvl::*``
in ``sparse_attention`` and ``decode_attention``), opaque to the compiler by design.
"""
