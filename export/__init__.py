"""ami.export: merge, export and check deployable engines (onnx, onnxruntime, tensorrt)."""
