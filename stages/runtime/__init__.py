"""Inference runtimes: ONNX Runtime sessions and graphs, TensorRT, and latency measurement."""
