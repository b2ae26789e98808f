# drguard.sandbox — the two commands: `make drill` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.drguard-installed
EMULATOR := $(PY) tools/emulator.py
COLLECTION_LINK := .collections/ansible_collections/drguard/sandbox
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export ANSIBLE_COLLECTIONS_PATH := $(CURDIR)/.collections
export ANSIBLE_LOCAL_TEMP := $(CURDIR)/.ansible/tmp
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help venv system-packages drill drill-tampered test lint sanity unit integration molecule e2e runner bench clean

help:
	@echo "make drill   - run a complete drill on the embedded AWS emulator"
	@echo "make test    - run the whole test suite (lint, pytest, molecule, end-to-end)"
	@echo "make bench   - benchmarks (figures, not pass/fail)"

venv: system-packages $(STAMP) $(COLLECTION_LINK)

# The netns sandbox runtime shells out to ip (iproute2) and nft (nftables): installed here
# with apt when missing and running as root; otherwise the missing packages are named.
SYSTEM_PACKAGES := ip:iproute2 nft:nftables

system-packages:
	@missing=""; for t in $(SYSTEM_PACKAGES); do \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v "$${t%%:*}" >/dev/null 2>&1 || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing (Debian)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing; \
	  else \
	    echo "missing system packages:$$missing - the netns sandbox runtime needs them; install them as root (apt-get install$$missing) or run make venv as root"; \
	  fi; \
	fi

$(STAMP): requirements.txt requirements-test.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 is required"; exit 1; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "installing python3-venv (Debian)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

$(COLLECTION_LINK):
	mkdir -p $(dir $@)
	ln -sfn ../../.. $@

drill: venv
	$(EMULATOR) run -- bash tools/demo.sh passing

drill-tampered: venv
	$(EMULATOR) run -- bash tools/demo.sh tampered

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ansible-lint --offline -q
	$(PY) tools/check_docs.py

# ansible-test sanity (validate-modules, pylint, pep8, ansible-doc, ...) on the built collection,
# offline: tools/sanity.py stages it and bootstraps ansible-test's virtualenvs from the package index.
sanity: venv
	$(PY) tools/sanity.py

unit: venv
	$(BIN)/pytest -q tests/unit

integration: venv
	$(BIN)/pytest -q -n 2 tests/integration

molecule: venv
	$(PY) tools/run_molecule.py

e2e: venv
	$(BIN)/pytest -q -n 2 --dist loadgroup tests/e2e

# Jobs the way AWX runs them (ansible-runner, transmit | worker | process) from a git archive with
# the collection installed from its tarball; part of e2e.
runner: venv
	$(BIN)/pytest -q -n 2 --dist loadgroup tests/e2e/test_runner_jobs.py

test: venv
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory sanity
	$(BIN)/pytest -q -n 2 tests/unit tests/integration
	$(MAKE) --no-print-directory molecule
	$(BIN)/pytest -q -n 2 --dist loadgroup tests/e2e

bench: venv
	$(PY) bench/drill_bench.py
	$(PY) bench/artifact_bench.py

clean:
	rm -rf $(VENV) .collections .pytest_cache .ruff_cache drill-runs bench/results .ansible collections/ansible_collections
