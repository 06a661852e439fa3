"""The lower layer (knows no engine type; imports only core/). Model descriptors -> ONNX -> optimised ONNX ->
TensorRT plans, with a manifest beside each artefact.

- descriptors.py  ComponentDescriptor: names, dtypes, dynamic axes, sample inputs, min/opt/max profiles
- wrappers.py     the torch modules that define each component's named inputs/outputs (the contract)
- onnx.py         export_component: legacy torch.onnx.export, opset 17, manifest cache
- fp16.py         fp16 conversion keeping overflow-prone ops in fp32
- optimize.py     onnxruntime transformer optimizer (GPU flavour; guarded against the numpy 2.4 crash)
- manifest.py     artefact directories with manifest.json, built in a temp dir and renamed
- tensorrt.py     engine build / cache / refit / runtime (written against TensorRT 10's API; NOT RUN IN CI)
"""
