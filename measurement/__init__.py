"""Measuring the model: tiny checkpoints in the upstream format, teacher forcing, what `verify_npu.py` checks, and the
soak mix of `loadtest.py`. `bench.py` and `loadtest.py` (root) are the scripts; remote code never imports this package.
"""
