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
PG_TESTS := tests/test_postgres.py tests/test_jobs_queue.py tests/test_jobs_integration.py \
	tests/test_study_design.py tests/test_study_fixtures.py tests/test_study_rater.py \
	tests/test_study_report.py tests/test_study_lifecycle.py tests/test_study_pdf.py \
	tests/test_analyze_responses.py tests/test_web_import.py \
	tests/test_web_shared_storage.py tests/test_web_shared_storage_s3.py tests/test_web_views.py \
	tests/test_security_csp.py tests/test_security_files.py tests/test_security_identity.py \
	tests/test_security_login.py tests/test_security_misc.py tests/test_security_redis_outage.py \
	tests/test_security_uploads.py tests/test_security_worker_recovery.py tests/test_security_zip.py \
	tests/test_viewer.py tests/test_workspace.py tests/e2e

test: $(STAMP) $(JS_STAMP)
	$(PY) -m pytest -q
	@echo "== the database-facing tests again on PostgreSQL"
	$(PY) -m tests.pgserver --skip-if-missing -- $(PY) -m pytest -q -p no:cacheprovider $(PG_TESTS)

demo: $(STAMP) $(JS_STAMP)
	$(PY) manage.py migrate --noinput -v 0
	$(PY) manage.py demo

bench: $(STAMP)
	$(PY) benchmarks/bench_deidentify.py

clean:
	rm -rf var demo-output .pytest_cache node_modules static/vendor
