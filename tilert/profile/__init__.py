"""Profiling on the CPU: per-pass compile time and IR size, a roofline of the cost model's per-kernel
predictions, and per-SM task timelines (predicted now, measured by the persistent kernel later)
exported as Chrome/Perfetto trace JSON. `python -m tilert profile`."""
