# The two commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv at the repository root and install what they need into it first.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# torch==2.13.0 is the CPU wheel on this platform; any other version pulls a CUDA build.
	$(PY) -m pip install --quiet -e '.[server,dev]'
	@touch $(STAMP)

setup: $(STAMP)

# Build outputs (repository, exports, images) stay in the checkout: .build/
demo: $(STAMP)
	DRIFFUSION_CACHE=.build $(VENV)/bin/driffusion demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q -rs
