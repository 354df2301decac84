# Two commands do all set-up: `make demo` and `make test`. Both (re)create .venv from the
# lock file when it is missing or the lock changed, then run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
STAMP := $(VENV)/.installed-lock
PYTEST_ARGS ?=

.PHONY: demo test install check-java lint bench airflow stack clean

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

# The consortium as containers (docker-compose.yml; docs/deployment.md): certificates, synthetic data
# for bankA..bankC and a .env with fresh secrets are made once, when missing; then compose builds and starts.
.PHONY: stack-files stack-test
stack-files: install
	@command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1 || { echo "error: docker with the compose plugin is needed (https://docs.docker.com/compose/install/)" >&2; exit 1; }
	@test -f .env || { $(BIN)/python -c 'import os, secrets, pathlib; from cryptography.fernet import Fernet; \
		fresh = {"FEDFRAUD_UID": str(os.getuid() or 10001), "AIRFLOW_FERNET_KEY": Fernet.generate_key().decode()}; \
		lines = pathlib.Path(".env.example").read_text().splitlines(); \
		pairs = [(line, line.partition("=")[0]) for line in lines]; \
		text = "".join((line if line.startswith("#") or "=" not in line else key + "=" + fresh.get(key, secrets.token_urlsafe(32))) + "\n" for line, key in pairs); \
		fd = os.open(".env", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600); os.write(fd, text.encode()); os.close(fd)' \
		&& echo ".env: written with fresh secrets (FEDFRAUD_UID=$$(sed -n 's/^FEDFRAUD_UID=//p' .env))"; }
	@test -f work/stack/certs/participants.json || $(BIN)/fedfraud provision --consortium fedfraud \
		--participants aggregator,bankA,bankB,bankC --operators airflow \
		--hosts aggregator,localhost,127.0.0.1 --out work/stack/certs
	@test -d work/stack/data/bankA && test -d work/stack/data/bankB && test -d work/stack/data/bankC || { \
		rm -rf work/stack/data work/stack/generated && mkdir -p work/stack/data && \
		$(BIN)/fedfraud generate --out work/stack/generated --banks 3 --rows 150000 --seed 7 && \
		set -- bankA bankB bankC && for bank in $$(ls work/stack/generated | sort); do \
			mv work/stack/generated/$$bank work/stack/data/$$1 && echo "work/stack/data/$$1: synthetic bank $$bank" && shift; done && \
		rmdir work/stack/generated; }
	@# Keys and data files are private to their owner (0600): as root, hand them to the containers' uid.
	@uid=$$(sed -n 's/^FEDFRAUD_UID=//p' .env); if [ "$$(id -u)" = 0 ] && [ -n "$$uid" ] && [ "$$uid" != 0 ]; then \
		chown -R "$$uid" work/stack/certs/aggregator work/stack/certs/airflow work/stack/certs/bankA \
			work/stack/certs/bankB work/stack/certs/bankC work/stack/data; fi

stack: stack-files
	docker compose up -d --build
	@echo "Airflow http://127.0.0.1:8080 (admin, AIRFLOW_ADMIN_PASSWORD in .env); MLflow http://127.0.0.1:5000; aggregator https://127.0.0.1:8443"

# Build, bring up, drive through Airflow/MLflow/the aggregator's API with faults, tear down (docker/stack_test.py).
stack-test: stack-files
	$(BIN)/python docker/stack_test.py

bench: install
	$(BIN)/python bench/feature_pipeline.py

clean:
	rm -rf $(VENV) work .pytest_cache
