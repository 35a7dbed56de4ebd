"""Runtime: the float engine, KV cache, decoding and chat sessions (the NPU path comes later)."""
