"""What plays the NPU: `qnn-htp` (onnxruntime-qnn) and `ort-cpu` (onnxruntime CPU integer kernels),
behind the `NpuBackend` protocol in `base`, declared once in `registry` (what each supports)."""
