# atomnode: `make run` and `make test` set themselves up (Debian packages, venv, deps).
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV   := .venv
BIN    := $(VENV)/bin
LISTEN ?= 127.0.0.1:4730
DB     ?= var/atomnode.db
PYTEST_ARGS ?=

.PHONY: all venv run test test-fast sysdeps-run sysdeps-test lint bench bench-quick deb repo test-deb clean

all: venv

sysdeps-run:
	@sh scripts/sysdeps.sh run

sysdeps-test:
	@sh scripts/sysdeps.sh test

$(BIN)/python:
	$(MAKE) sysdeps-run
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$$(sed -n 's/^\(pip==[^ ]*\).*/\1/p' packaging/build-requirements.txt)"

# Runtime dependencies at the versions the .deb ships (packaging/requirements.txt), so the
# tests run what users get. The install compiles the Gearman hot path with mypyc (setup.py)
# into .so files beside the sources, which Python imports instead of the .py: an edit to
# one of HOT_MODULES rebuilds them here (tests/conftest.py refuses to run stale ones).
# The pins without their hashes: pip refuses hash-checking for an editable install.
HOT_MODULES := atomnode/gearman/protocol.py atomnode/gearman/broker.py atomnode/gearman/server.py
$(VENV)/.installed: pyproject.toml packaging/requirements.txt setup.py $(HOT_MODULES) | $(BIN)/python
	sed -n 's/^\([A-Za-z0-9_.-]*==[^ ]*\).*/\1/p' packaging/requirements.txt >$(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e '.[test]'
	@# mypyc's generated C (setup.py): a build leaves nothing in the tree (make test-deb checks).
	rm -rf build
	@touch $@

venv: $(VENV)/.installed

run: venv
	@mkdir -p $(dir $(DB))
	exec $(BIN)/atomnode run --listen $(LISTEN) --db $(DB)

test: sysdeps-test venv lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The in-process tests: no third-party peers (gearmand, PHP, Perl, a browser, network
# namespaces) and no daemon processes; what to run while editing. `make test` runs all.
FAST_TESTS := tests/test_protocol.py tests/test_broker.py tests/test_admin.py \
	tests/test_config.py tests/test_store.py tests/test_reads.py tests/test_walcheck.py \
	tests/test_jobs_cli.py tests/test_layering.py tests/test_console_api.py \
	tests/test_config_dropins.py tests/test_packaging_pins.py tests/test_maintscripts.py

test-fast: venv
	$(BIN)/python -m pytest -m "not interop and not slow" $(FAST_TESTS) $(PYTEST_ARGS)

# Fails on any finding (rules in pyproject.toml, [tool.ruff]). mypy checks the modules
# mypyc compiles: a type error there would make the build fall back to pure Python.
lint: venv
	$(BIN)/python -m ruff check atomnode tests bench
	$(BIN)/python -m mypy $(HOT_MODULES)

clean:
	rm -rf $(VENV) var dist build *.egg-info .pytest_cache .hypothesis

# Debian package (issue 6): dist/atomnode_<version>_<arch>.deb, built in a clean environment.
deb:
	sh packaging/build-deb.sh

# A signed apt repository in dist/repo (issue 15), from the package(s) in dist/ (built
# first when there is none). The signing key is an input: GNUPGHOME=DIR or REPO_KEY=FILE
# (and REPO_KEY_ID=ID); see packaging/build-repo.sh and docs/install.md.
repo:
	@ls dist/atomnode_*.deb >/dev/null 2>&1 || sh packaging/build-deb.sh
	sh packaging/build-repo.sh

# End-to-end test of the package under a real systemd (systemd-nspawn); needs root.
test-deb:
	bash tests/packaging/run.sh

# Side-by-side benchmark, atomnode vs gearmand 1.1.20 (issues 2 and 3); see docs/performance.md.
# Knobs: SCALE (1), REPS (3), SECTIONS, SERVERS; SCALE=0.05 REPS=1 is a quick smoke run.
bench: venv
	@sh scripts/sysdeps.sh bench
	bash bench/run.sh

# The primary rows of issue 12 (CPU per job, round trips, serial latency, durable background
# latency, idle RSS), medians of 3, in under a minute.
bench-quick: venv
	@sh scripts/sysdeps.sh bench
	SCALE=0.15 REPS=3 QUICK_REPS=3 RSS_SETTLE=1 SECTIONS="roundtrip serial bglat rss" bash bench/run.sh
