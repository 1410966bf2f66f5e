# Mailgate: `make run` starts the appliance, `make test` runs the tests. `make help` lists the rest.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
export DJANGO_SETTINGS_MODULE := appliance.settings

.PHONY: help run test screenshots lint migrate superuser services bench clean

help:  ## this list
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is needed (Debian: apt-get install python3 python3-venv)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# Without a SECRET_KEY the settings refuse to load, except for `make run` (and the tests): appliance/settings.py.
run: export ALLOW_INSECURE_SECRET ?= true
run: $(VENV)/.installed  ## start the appliance: SMTP on :2525, web UI on :8000, the worker
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput -v0
	$(PY) manage.py runappliance

# Tests use the PostgreSQL on 127.0.0.1 when it answers (as on CI), else SQLite; set
# TEST_DATABASE_URL to choose. Django creates and drops its own test_ database.
TEST_DATABASE_URL ?= $(shell python3 -c 'import socket; s = socket.socket(); s.settimeout(1); print("postgres://postgres@127.0.0.1:5432/mailgate" if s.connect_ex(("127.0.0.1", 5432)) == 0 else "")')

test: $(VENV)/.installed  ## run the whole test suite (services it finds are used; with CI set, all are required)
	DATABASE_URL="$(TEST_DATABASE_URL)" $(PY) -m pytest $(PYTEST_ARGS)

screenshots: $(VENV)/.installed  ## retake docs/screenshots/ from the browser tests
	UPDATE_SCREENSHOTS=1 DATABASE_URL="$(TEST_DATABASE_URL)" $(PY) -m pytest -m browser $(PYTEST_ARGS)

lint: $(VENV)/.installed  ## ruff, and the architecture rules of pyproject.toml (import-linter; docs/architecture.md)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

migrate: $(VENV)/.installed  ## apply database migrations
	$(PY) manage.py migrate

superuser: $(VENV)/.installed  ## create an administrator login
	$(PY) manage.py createsuperuser

services:  ## install and start spamd and clamd with the offline configuration (Debian, as root)
	bash .ci/services.sh

bench: $(VENV)/.installed  ## run the benchmarks (needs PostgreSQL, Redis, spamd, clamd; see docs/benchmarks.md)
	$(PY) bench/intake
	$(PY) bench/pipeline
	$(PY) bench/reports

clean:  ## remove the virtualenv and local data
	rm -rf $(VENV) data
