"""What plays the NPU: `qnn-htp` (onnxruntime-qnn), `ort-cpu` (onnxruntime CPU integer kernels),
and the float32 numpy reference. All share the small interface in `base`."""
