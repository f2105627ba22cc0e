# Two commands do everything:  make run  (the notebooks of a profile)  and  make test.
# Both set up what is missing first (system packages when possible, .venv, the project) and reuse
# what exists, so a second call starts at once.
PROFILE ?= quick
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.audiokd-installed
FROM ?=
SET ?=
# Threads: small models on a 2-core machine run faster on one thread, and OpenMP spin-waiting
# under contention turned 7 ms inferences into 1 s ones (docs/measurements.md): wait passively.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: run test setup notebooks lab mlflow report clean-outputs readme-results

run: setup
	$(BIN)/python -m audiokd_lib run --params params/$(PROFILE).yaml $(if $(FROM),--from $(FROM)) $(if $(SET),--set $(SET))

test: setup
	bash scripts/install-system-deps.sh --browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install-system-deps.sh
	bash scripts/install-system-deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e ".[dev]"
	$(BIN)/python -m pip install --no-deps tinysoundfont==0.3.7
	touch $(STAMP)

# Rebuild every .ipynb from its reviewed .py twin (outputs never enter the committed notebooks).
notebooks: setup
	$(BIN)/jupytext --to ipynb --update notebooks/[0-9]*.py

# As root (a container, a cloud notebook) Jupyter refuses to start without --allow-root: pass it there only.
# Jupyter prints the URL with its token.
lab: setup
	$(BIN)/jupyter lab --ip 127.0.0.1 $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/

# Every executed notebook of the profile as an HTML page, under outputs/$(PROFILE)/report/.
report: setup
	$(BIN)/python -m audiokd_lib report --profile $(PROFILE)

# The MLflow UI on the profile's store (outputs/$(PROFILE)/mlflow.db), on 127.0.0.1:$(PORT).
PORT ?= 5000
mlflow: setup
	$(BIN)/python -m audiokd_lib mlflow --profile $(PROFILE) --port $(PORT)

# Copy the quick profile's table, headline and figures (made by `make run`) into the README.
readme-results: setup
	$(BIN)/python scripts/readme_results.py quick
