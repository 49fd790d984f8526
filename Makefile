# A newcomer runs `make demo` and `make test`; everything else is set up on the way.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo_output

.PHONY: setup demo test clean container-check browser viewer benchmark

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,viewer]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/nuclei-app demo --output-dir $(DEMO_DIR)

# The report.html browser test needs Debian's chromium: installed here when missing and
# running as root (CI containers); otherwise the test says why it skipped (it fails when CI=true).
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ ! -x "$(CHROMIUM)" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	fi

# The napari viewer test needs a virtual X display (Debian's xvfb) for Qt's OpenGL context:
# installed here like chromium (as root, when missing); otherwise the test fails in CI.
XVFB ?= /usr/bin/Xvfb
viewer:
	@if [ ! -x "$(XVFB)" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			xvfb libgl1 libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libfontconfig1 libdbus-1-3; \
	fi

test: setup browser viewer
	$(BIN)/python -m pytest

clean:
	rm -rf $(DEMO_DIR) .pytest_cache test-artifacts

# Replays the Dockerfile's COPY + pip install steps in a clean venv (a fresh torch install:
# minutes and GBs, so never part of `make test`), then runs the entry point read-only in the
# BIDS-Apps form on the sample dataset. See tools/container_check.py.
# TORCH_VARIANT=cpu replays the slim CPU image (needs PyTorch's CPU wheel index reachable).
TORCH_VARIANT ?=
container-check: setup
	$(BIN)/python tools/container_check.py $(if $(TORCH_VARIANT),--build-arg TORCH_VARIANT=$(TORCH_VARIANT))

# The evidence table of issue 7: nuclei_app vs Otsu/LoG watershed, StarDist, Cellpose 3 and a
# plain Mask R-CNN, plus ablations and upper bounds, on every source under BENCHMARK_DATA.
# The peers live in their own venv (TensorFlow needs an older numpy than constraints.txt pins).
# Hours on 2 CPU cores at the default budget: each trained method gets BUDGET_MINUTES per source.
BENCHMARK_VENV ?= .venv-benchmark
BENCHMARK_STAMP := $(BENCHMARK_VENV)/.installed-stamp
BENCHMARK_DATA ?= ../shared/data/nuclei-gt
BUDGET_MINUTES ?= 10
BENCHMARK_OPTIONS ?=

$(BENCHMARK_STAMP): pyproject.toml benchmarks/constraints.txt
	$(PYTHON) -m venv $(BENCHMARK_VENV)
	$(BENCHMARK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCHMARK_VENV)/bin/python -m pip install --quiet -c benchmarks/constraints.txt -e '.[benchmark]'
	touch $(BENCHMARK_STAMP)

benchmark: $(BENCHMARK_STAMP)
	$(BENCHMARK_VENV)/bin/python benchmarks/compare.py --data $(BENCHMARK_DATA) \
		--budget-minutes $(BUDGET_MINUTES) $(BENCHMARK_OPTIONS)
