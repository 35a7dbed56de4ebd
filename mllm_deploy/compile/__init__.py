"""Compile stage: quantize weights, build static-shape QDQ ONNX graphs per layer, audit them."""
