"""Export of checkpoints to ONNX graphs and TensorRT engines, the ONNX Runtime custom operator, and the
parity checks between the exported graphs and PyTorch."""
