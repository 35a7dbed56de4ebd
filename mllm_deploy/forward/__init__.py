"""The float model's forward pieces, below both the compiler (calibration runs them) and the
runtime: numpy layers, RoPE tables, the KV cache and the float32 engine."""
