# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the tests).
# Each creates .venv, installs torch 2.13.0 (CPU build) first, then the package with its dev extras.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup data test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,ray]'
	touch $(STAMP)

setup: $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist; without it the demo falls back to digits.
data:
	@if ls /usr/share/datasets/fashion-mnist/*idx3* >/dev/null 2>&1; then \
	  echo "fashion-mnist: found in /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	    || echo "could not install dataset-fashion-mnist: the demo will use digits"; \
	else \
	  echo "fashion-mnist not installed (as root: apt-get install dataset-fashion-mnist): the demo will use digits"; \
	fi

# -n auto: one pytest-xdist worker per core, at most 4 (tests/conftest.py); --dist loadfile keeps each test
# file on one worker, so its module fixtures are built once and its tests run in file order.
test: setup
	$(PY) -m pytest -q -n auto --dist loadfile

demo: setup data
	rm -rf runs/demo
	$(VENV)/bin/robustnas run --config configs/demo.yaml --out runs/demo

bench: setup
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) runs .pytest_cache
