"""embedseg_exporters: checkpoints to ONNX models and TensorRT engines, verified on every export."""

__version__ = "0.1.0"
