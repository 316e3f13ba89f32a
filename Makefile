# deidstudy — `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deidstudy-installed
# browser libraries (NiiVue) from the npm registry, copied into static/vendor/
JS_STAMP := node_modules/.deidstudy-vendored

.PHONY: demo test install bench clean

install: $(STAMP) $(JS_STAMP)

$(STAMP): requirements.txt scripts/system_deps.sh
	@bash scripts/system_deps.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -r requirements.txt
	@touch $(STAMP)

$(JS_STAMP): package.json package-lock.json scripts/vendor_js.sh
	@bash scripts/vendor_js.sh

# Tests that talk to the database run a second time on a private PostgreSQL server.
test: $(STAMP) $(JS_STAMP)
	$(PY) -m pytest -q
	@echo "== the database-facing tests again on PostgreSQL"
	$(PY) -m tests.pgserver --skip-if-missing -- $(PY) -m pytest -q -p no:cacheprovider -m postgres

demo: $(STAMP) $(JS_STAMP)
	$(PY) manage.py migrate --noinput -v 0
	$(PY) manage.py demo

bench: $(STAMP)
	$(PY) benchmarks/bench_deidentify.py

clean:
	rm -rf var demo-output .pytest_cache node_modules static/vendor
