"""Profiling on the CPU: per-pass compile time and IR size, a roofline of the cost model's per-kernel
predictions, and per-SM task timelines (predicted from the schedule, or measured by the persistent
kernel with --measure) exported as Chrome/Perfetto trace JSON. `python -m tilert profile`.
`trace_analysis` reads a measured trace (stream rates, hand-overs per task kind); `calibration` fits
the persistent cost model to measured traces and predicts a rank's step."""
