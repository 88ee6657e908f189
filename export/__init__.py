"""Export diffusers pipelines (SD2.1, SDXL, SD3) to ONNX and TensorRT; tiny offline pipelines."""
