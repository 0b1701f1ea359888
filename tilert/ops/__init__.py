"""The math of every op, in plain torch: the single source of truth for references.

IR op kinds, kernel tests and the reference executor all call these functions; fused ops'
references are compositions of them, so there is exactly one definition of each computation.
Everything computes in float32 (or wider) regardless of the storage dtype of its inputs.
"""

from tilert.ops.attention import attention, attention_slots, kv_append, kv_append_slots, rope
from tilert.ops.linear import dequant_fp8, dequant_mxfp4, fp8_linear, linear, mxfp4_linear
from tilert.ops.moe import (
    combine_weights,
    expert_linear,
    moe_combine,
    moe_experts,
    route,
    select_experts,
    silu_mul,
)
from tilert.ops.norm import rms_norm
from tilert.ops.qtensor import QTensor
from tilert.ops.sampling import argmax, dflash_accept

__all__ = [
    "QTensor",
    "argmax",
    "attention",
    "attention_slots",
    "combine_weights",
    "dequant_fp8",
    "dequant_mxfp4",
    "dflash_accept",
    "expert_linear",
    "fp8_linear",
    "kv_append",
    "kv_append_slots",
    "linear",
    "moe_combine",
    "moe_experts",
    "mxfp4_linear",
    "rms_norm",
    "rope",
    "route",
    "select_experts",
    "silu_mul",
]
