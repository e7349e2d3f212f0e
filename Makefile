# `make demo` and `make test` each build .venv from nothing on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# llama.cpp (inside llama-cpp-python) is compiled here from source, for this CPU (GGML_NATIVE) but without
# Intel AMX: on virtual machines whose CPU flags list amx_tile/amx_int8 the tile instructions can still trap,
# and a native build that compiled them in dies with SIGILL in its first matrix product (README, "llama.cpp").
# --no-cache-dir: a wheel pip built and cached earlier, perhaps with AMX, is never reused.
ifeq ($(shell uname -m),x86_64)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif
LLAMA_CPP_BUILD := CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)"

.PHONY: demo test test-fast bench llama-cpp clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(LLAMA_CPP_BUILD) $(PY) -m pip install --quiet --no-cache-dir -c constraints.txt llama-cpp-python
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bitalloc demo

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) bench/solvers.py

# Rebuild llama.cpp for this machine (e.g. after copying .venv to another CPU).
llama-cpp: $(STAMP)
	$(LLAMA_CPP_BUILD) $(PY) -m pip install --quiet --no-cache-dir --force-reinstall --no-deps -c constraints.txt \
		llama-cpp-python

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
