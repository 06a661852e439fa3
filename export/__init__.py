"""Model descriptors -> ONNX -> optimised ONNX -> TensorRT plans, with a manifest beside each artefact."""
