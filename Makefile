# emerflow_jax: install, test and run.
#
#   make setup   creates .venv and installs requirements*.txt (instant when done)
#   make test    runs the test suite (data from $EMERFLOW_DATA_DIR, else ../shared/data)
#   make run     runs every method on MovieLens-100K into runs/movielens100k/
#   make clean   removes .venv and caches (never runs/ results)
#
# TORCH_INDEX adds a package index for the optional LLM side, e.g.
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
# so that torch comes as the CPU build rather than PyPI's CUDA build.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_INDEX ?=
# Re-running setup is instant: the stamp is newer than every requirements file.
STAMP := $(VENV)/.installed
REQS := $(wildcard requirements.txt requirements-llm.txt requirements-llm-nodeps.txt)
# requirements-llm-nodeps.txt lists packages installed without their declared
# dependencies (which would pull in unwanted extras).

.PHONY: setup test run clean

setup: $(STAMP)

$(STAMP): $(REQS)
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -r requirements.txt
	if [ -f requirements-llm.txt ]; then $(VPY) -m pip install \
	  $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -r requirements-llm.txt; fi
	if [ -f requirements-llm-nodeps.txt ]; then \
	  $(VPY) -m pip install --no-deps -r requirements-llm-nodeps.txt; fi
	touch $@

# pytest-xdist workers (TEST_WORKERS=0 runs in one process); loadscope keeps a
# module's tests on one worker, so a module-scoped fixture is built once.
TEST_WORKERS ?= 2
test: setup
	EMERFLOW_DATA_DIR=$${EMERFLOW_DATA_DIR:-../shared/data} $(VPY) -m pytest -q \
	  $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadscope) tests

SEEDS ?= 3
run: setup
	EMERFLOW_DATA_DIR=$${EMERFLOW_DATA_DIR:-../shared/data} $(VPY) -m experiments.compare \
	  --config=experiments/configs/movielens100k.py --workdir=runs/movielens100k \
	  --methods=base,dropoutnet,metaemb,mwuf,cvar,emerflow --backbones=deepfm \
	  --seeds=$(SEEDS)
	@cat runs/movielens100k/comparison.md
	@echo "Table: runs/movielens100k/comparison.md  Plot: runs/movielens100k/comparison.png"
	@echo "Curves: tensorboard --logdir runs/movielens100k"

clean:
	rm -rf $(VENV) .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
