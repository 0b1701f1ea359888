"""Tile kernels (TileLang) for Hopper: MXFP4 GEMM, FP8 block-scaled GEMM, fused MoE.

Each kernel file holds a body of its tile coordinates (a `T.macro`), a thin standalone launcher,
`run(...)`, the torch `reference` (from tilert.ops), `check(...)` and the configs the MiMo plan
needs. Importing this package does not import tilelang; see `tilert.kernels.common`.
"""
