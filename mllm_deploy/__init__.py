"""mllm-deploy: chunked INT8 NPU prefill with shadow outliers and out-of-order scheduling."""

__version__ = "0.1.0"
