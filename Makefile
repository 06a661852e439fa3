# Two entry points, both self-contained on a fresh machine:
#   make demo   set up .venv and generate an image on the embedded default model
#   make test   set up .venv and run the whole test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-pins.txt | sha1sum | cut -c1-12)

.PHONY: setup test demo bench pictures clean
setup: $(STAMP)

$(STAMP): pyproject.toml requirements-pins.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# CPU torch first, pinned: a looser requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q -c requirements-pins.txt "torch==2.13.0"
	$(BIN)/pip install -q -c requirements-pins.txt -e ".[dev,server,controlnet,tome,int8]"
	# k-diffusion is the parity reference for the samplers; its __init__ drags in torchvision,
	# wandb, kornia..., so it is installed without dependencies and only sampling.py is loaded.
	$(BIN)/pip install -q --no-deps -c requirements-pins.txt k-diffusion
	# spandrel (model upscalers; with spandrel_extra_arches, dlib-bin and einops: the faces extra, restore_faces
	# tests) without its torchvision requirement: a CUDA torchvision beside the CPU torch breaks `import
	# torchvision`; engine/spandrel_loader.py loads spandrel's architectures without it
	$(BIN)/pip install -q --no-deps -c requirements-pins.txt spandrel spandrel_extra_arches dlib-bin einops
	# ADetailer's MediaPipe detectors (the adetailer extra) without mediapipe's opencv-contrib-python (a second
	# cv2 over opencv-python-headless) and sounddevice: the Tasks API's face detector needs neither
	$(BIN)/pip install -q --no-deps -c requirements-pins.txt mediapipe absl-py
	# controlnet_aux (the annotators extra: model-based ControlNet preprocessors) without torchvision, timm and
	# scikit-image: engine/controlnet/annotators.py loads only the sub-modules it runs (scipy, einops and
	# huggingface_hub, which it imports, come with the dependencies above)
	$(BIN)/pip install -q --no-deps -c requirements-pins.txt controlnet_aux
	touch $@

test: setup
	# test files in parallel, one worker per core (at most 4); a file's tests share one worker (module fixtures)
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 --dist loadfile

DEMO_CKPT := engine/models/bundled/Stable-diffusion/sdengine-demo.safetensors
demo: setup
	@MODELS="$$($(BIN)/python -c 'from engine.config import default_models_dir; print(default_models_dir())')"; \
	if [ ! -f $(DEMO_CKPT) ] && [ -z "$$(ls "$$MODELS/Stable-diffusion" 2>/dev/null)" ]; then \
	  echo "NOTE: no trained demo model is bundled in this checkout: writing tiny models with RANDOM weights"; \
	  echo "      to $$MODELS (the picture will be noise-like, not the prompt)."; \
	  $(BIN)/sdengine models write-tiny "$$MODELS"; fi
	$(BIN)/sdengine txt2img --prompt "a large red circle in the middle on a blue background" --steps 20 --cfg-scale 1.5 --seed 1 --output outputs/demo.png

bench: setup
	for b in sampler_overhead pipeline_e2e submit_latency; do $(BIN)/python -m benchmarks $$b || exit 1; done

# the README's picture (the demo model's images with their prompts) and BENCHMARKS.md's summary table and chart
pictures: setup
	$(BIN)/python -m benchmarks readme_picture
	$(BIN)/python -m benchmarks plot

clean:
	rm -rf $(VENV) .pytest_cache
