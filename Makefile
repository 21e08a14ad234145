# Two commands set up a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEBS := wireguard-go wireguard-tools iperf3 iproute2 iputils-ping coturn nftables postgresql
# Binaries that tell whether each Debian package is present.
DEB_BINS := wireguard-go wg iperf3 ip ping turnserver nft pg_ctlcluster

.PHONY: all venv debs peers demo test test-quick test-long bench lint clean

all: test

$(VENV)/.installed: pyproject.toml setup.py $(wildcard native/*.c native/*.h native/*.py)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Under CI the fast path must build: a failed build is an error there, not a warning.
	PYWG_REQUIRE_NATIVE=$(if $(filter true,$(CI)),1,) $(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# As root, install the Debian packages the tests and the demo drive, when missing.
debs:
	@missing=""; for b in $(DEB_BINS); do command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing:$$missing; run as root to install $(DEBS)" >&2; exit 1; fi; \
	  echo "installing Debian packages ($(DEBS)) for:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEBS); \
	fi

# The real peers the tests and benchmarks run pywg against (wireguard-go 0.0.20250522,
# boringtun-cli 0.7.1, Tailscale's derper/derpprobe 1.102.3), pinned in tests/peers/install.py,
# built once per machine from the Go module proxy and crates.io into ~/.cache/pywg/peers.
peers:
	$(PYTHON) tests/peers/install.py

demo: venv debs peers
	$(PY) -m pywg.demo

test: venv debs peers
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

# The developer loop: no root, no namespaces, no peers; leaves out the netns tests and the
# `slow` 1,000,000-iteration X25519 vector (both still run by `make test`, hence in CI).
test-quick: venv
	$(PY) -m pytest -q -m "not netns and not slow and not long" $(PYTEST_ARGS)

# The long suite (deselected by `make test`): rekeys across REKEY_AFTER_TIME in real time.
test-long: venv debs peers
	$(PY) -m pytest -q -m long $(PYTEST_ARGS)

bench: venv debs peers
	$(PY) -m pytest -q bench --benchmark-only

# As root: the pywg daemon against the real peers on the namespace bed (iperf3 TCP/UDP, ping
# RTT, daemon CPU per GB); replaces its section of bench/RESULTS.md.
.PHONY: bench-bed
bench-bed: venv debs peers
	$(PY) -m bench.bed --write-results

lint: venv
	$(VENV)/bin/ruff check pywg tests bench
	$(VENV)/bin/mypy pywg

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
