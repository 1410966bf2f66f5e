# Mailgate: `make run` starts the appliance, `make test` runs the tests. `make help` lists the rest.
# Python 3.11 or newer: python3.11 where it is installed, else the system's python3 (Debian 12: 3.11, 13: 3.13).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null || echo python3)
VENV ?= .venv
PY := $(VENV)/bin/python
export DJANGO_SETTINGS_MODULE := appliance.settings

.PHONY: help run test screenshots lint lock migrate superuser services bench clean

help:  ## this list
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# The virtualenv holds exactly the locked versions, every file checked against its hash (requirements-dev.lock;
# `make lock` writes it from requirements*.txt).
$(VENV)/.installed: requirements-dev.lock
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is needed (Debian: apt-get install python3 python3-venv)"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "$(PYTHON) is older than Python 3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r requirements-dev.lock || { echo "python-ldap is built against \
	OpenLDAP's client library (Debian: apt-get install gcc python3-dev libldap2-dev libsasl2-dev)"; exit 1; }
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

# pip-tools resolves requirements.txt (what the appliance needs) and requirements-dev.txt (and what the tests
# need) into the two locks, every transitive dependency pinned with the hashes of its files on PyPI.
lock: export CUSTOM_COMPILE_COMMAND = make lock
lock: $(VENV)/.installed  ## re-resolve requirements*.txt into requirements.lock and requirements-dev.lock
	$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
		--no-emit-find-links -o requirements.lock requirements.txt
	$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
		--no-emit-find-links -o requirements-dev.lock requirements-dev.txt

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
