# Two commands do all set-up: `make demo` and `make test`. Both (re)create .venv from the
# lock file when it is missing or the lock changed, then run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
STAMP := $(VENV)/.installed-lock
PYTEST_ARGS ?=

.PHONY: demo test install check-java lint bench airflow clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@$(MAKE) --no-print-directory check-java
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 (or run make PYTHON=/path/to/python3.11)" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip sync --quiet --python $(BIN)/python requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	@cp requirements.lock $(STAMP)

check-java:
	@command -v java >/dev/null 2>&1 || { echo "error: Java is missing. Spark needs a Java 17 runtime: install it (Debian/Ubuntu: apt-get install openjdk-17-jre-headless; macOS: brew install openjdk@17) and run again." >&2; exit 1; }

demo: install
	$(BIN)/fedfraud demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff check --select AIR --preview dags

# Airflow on this machine: standalone on 127.0.0.1, its home inside the work dir, dags/ as DAG folder.
AIRFLOW_HOME_DIR := $(CURDIR)/work/airflow/home
airflow: install
	@mkdir -p $(AIRFLOW_HOME_DIR)
	AIRFLOW_HOME=$(AIRFLOW_HOME_DIR) AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags \
	AIRFLOW__CORE__LOAD_EXAMPLES=False AIRFLOW__API__HOST=127.0.0.1 AIRFLOW__API__PORT=8080 \
	FEDFRAUD_WORK_DIR=$(CURDIR)/work/airflow PATH=$(CURDIR)/$(BIN):$$PATH \
	$(BIN)/airflow standalone

bench: install
	$(BIN)/python bench/feature_pipeline.py

clean:
	rm -rf $(VENV) work .pytest_cache
