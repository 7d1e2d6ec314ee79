# vchitect — set-up, demo, tests and benchmarks.
# Every target creates .venv and installs what it needs when missing; `make setup` is quick
# when nothing changed (a stamp keyed on pyproject.toml, setup.py and constraints.txt).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
EXTRAS ?= dev
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py constraints.txt | sha1sum | cut -c1-12)-$(EXTRAS)
PYTEST_ARGS ?=

.PHONY: setup demo test bench bench-gpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade -c constraints.txt pip "setuptools>=77" wheel
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt --no-build-isolation -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: setup
	$(PY) -m vchitect.cli demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# CPU benchmarks (figures go into benchmarks/RESULTS.md by hand or by the scripts that say so).
# GPU figures: make bench-gpu; also benchmarks/step.py --preset 2b … and benchmarks/max_seq.py on a GPU machine.
bench: setup
	$(PY) -m vchitect.cli model-info configs/model/vchitect-2b.yaml --frames 40 --height 432 --width 768
	$(PY) benchmarks/step.py --preset tiny --nproc 4 --layout tp2,sp2
	$(PY) benchmarks/parallel_comm.py
	$(PY) benchmarks/loader.py --samples 24 --repeats 3
	$(PY) benchmarks/sampling.py --preset demo
	$(PY) benchmarks/curate.py --no-write

# GPU figures at real shapes (benchmarks/gpu.py; the 2B sampling step at 40×432×768 in bf16, …): one JSON line
# per configuration, printed and appended to $OUT/bench-gpu.jsonl when OUT is set, else to
# benchmarks/results/bench-gpu.jsonl. `python benchmarks/gpu.py --dry-run` checks the same code on CPU.
bench-gpu: setup
	$(PY) benchmarks/gpu.py --out "$${OUT:-benchmarks/results}/bench-gpu.jsonl"

clean:
	rm -rf $(VENV) .pytest_cache
