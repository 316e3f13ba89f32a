# deidstudy — `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deidstudy-installed

.PHONY: demo test install bench clean

install: $(STAMP)

$(STAMP): requirements.txt scripts/system_deps.sh
	@bash scripts/system_deps.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -r requirements.txt
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) manage.py migrate --noinput -v 0
	$(PY) manage.py demo

bench: $(STAMP)
	$(PY) benchmarks/bench_deidentify.py

clean:
	rm -rf var demo-output .pytest_cache
