"""Eager GPU runtime: one launch per fused op, optional CUDA-graph capture of a whole step
(`runtime.py`); the rank context its implementations use (`context.py`); ranks over torch.distributed
(`distributed.py`)."""
