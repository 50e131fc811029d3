"""Deploy: export a run's model (ONNX, TorchScript, safetensors), evaluate it, classify image
files, benchmark size and speed. No Ray; ONNX files need only onnxruntime and NumPy."""
