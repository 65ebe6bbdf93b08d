# Two commands do all the set-up on a fresh machine:
#   make example   - creates .venv (CPython 3.10), installs everything, builds, runs the example
#   make test      - the same set-up, then the whole test suite
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV := .venv
PY := $(VENV)/bin/python
# OneFlow 0.9.0 has wheels for CPython 3.7-3.10 only; find a 3.10.
PYTHON310 ?= $(shell for p in $$HOME/.pyenv/versions/3.10*/bin/python3.10 $$(command -v python3.10); do \
	"$$p" -c "import sys; assert sys.version_info[:2] == (3, 10)" 2>/dev/null && { echo "$$p"; break; }; done)
CSRC := $(shell find csrc -type f) CMakeLists.txt pyproject.toml oneflow_rope/op_table.json \
	oneflow_rope/op_table.py tools/gen_op_table.py

.PHONY: setup build example test test-sanitize bench-gpu clean

setup: $(VENV)/.built

$(VENV)/.deps: requirements-dev.txt
	@test -n "$(PYTHON310)" || { echo "error: CPython 3.10 not found (OneFlow 0.9.0 needs 3.7-3.10); set PYTHON310=/path/to/python3.10"; exit 1; }
	test -x $(PY) || $(PYTHON310) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(CSRC)
	$(PY) -m pip install --no-build-isolation --no-deps -v -e . 2>&1 | tail -n 25
	$(PY) -c "import oneflow_rope, oneflow_rope._C; print('oneflow_rope ready:', oneflow_rope._C.__file__)"
	touch $@

example: setup
	$(PY) examples/llama_attention.py

test: setup
	$(PY) -m tests.run_suite

clean:
	rm -rf build $(VENV) oneflow_rope/*.so
