# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	# The pinned CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[plot,dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VPY) examples/demo.py

test: $(STAMP)
	$(VPY) -m ruff check remlstop tests benchmarks examples
	$(VPY) -m ruff format --check remlstop tests benchmarks examples
	$(VPY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
