"""PyTorch -> ONNX export through optimum's exporter."""
