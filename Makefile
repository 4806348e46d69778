# Two commands for a newcomer: `make demo` and `make test`. Everything they need is installed from here.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Debian 12 packages the project runs or validates against (real parts, never mocks).
APT_PACKAGES := python3-venv pacemaker pacemaker-cli-utils corosync corosync-qdevice corosync-qnetd crmsh \
	resource-agents fence-agents libxml2-utils kamailio kamailio-extra-modules kamailio-json-modules kamailio-tls-modules kamailio-websocket-modules kamailio-sqlite-modules libev4 \
	zookeeper sip-tester sipsak sipvicious snmp snmptrapd iproute2 procps psmisc openssh-server openssh-client util-linux \
	ansible ansible-lint vagrant python3-apt

.PHONY: help apt venv test unit lab-test lint demo install-agents clean

help:
	@echo "make demo   - install what is needed, bring the lab up, run a failover, print the report"
	@echo "make test   - install what is needed and run the full test suite (unit + lab)"

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(VENV)/.stamp: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.lock
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.stamp

lint: venv
	$(VENV)/bin/ruff check .

unit: apt venv
	$(PY) -m pytest -q tests/unit

lab-test: apt venv
	$(PY) -m pytest -q tests/lab

test: apt venv lint
	$(PY) -m pytest -q tests

# The lab (two nodes + witness in namespaces), then one node-crash drill: the VIP's node is powered off while
# 20 registered phones, 5 established calls and an OPTIONS probe every 20 ms go through the VIP; the report
# (gap, registrations reachable, BYEs completed, split brain) is printed and drill.png drawn. The lab is always
# taken down, also on failure or Ctrl-C.
demo: apt venv
	@if $(MAKE) -n install-agents >/dev/null 2>&1 && [ -n "$$(ls resource_agents 2>/dev/null)" ]; then \
		$(MAKE) --no-print-directory install-agents; fi
	@trap '$(VENV)/bin/sipha lab down' EXIT; set -e; \
	$(VENV)/bin/sipha lab up examples/lab.yaml; \
	$(VENV)/bin/sipha lab status; \
	$(VENV)/bin/sipha drill --fault node-crash --registrations 20 --calls 5 --wait 60 --plot drill.png

# Pacemaker runs agents from /usr/lib/ocf/resource.d with a bare environment and the system python3: the
# installed copies carry this checkout's path (SIPHA_HOME, where ha/ and resource_agents/ocfagent.py live) and
# its venv python (SIPHA_PYTHON, for the coordinator service). `install -C` leaves identical files alone.
OCF_SIPHA := /usr/lib/ocf/resource.d/sipha
install-agents:
	@set -e; install -d -m 755 $(OCF_SIPHA); tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	for pair in sipha-proxy:$(OCF_SIPHA)/proxy sipha-coordinator:$(OCF_SIPHA)/coordinator \
			sipha-vip:$(OCF_SIPHA)/vip fence_sipha_lab:/usr/sbin/fence_sipha_lab; do \
		src=$${pair%%:*}; dst=$${pair#*:}; \
		sed -e 's|^SIPHA_HOME = "".*|SIPHA_HOME = "$(CURDIR)"  # written by make install-agents|' \
			-e 's|^SIPHA_PYTHON = "".*|SIPHA_PYTHON = "$(CURDIR)/$(VENV)/bin/python"  # written by make install-agents|' \
			resource_agents/$$src > "$$tmp/$$src"; \
		install -C -m 755 "$$tmp/$$src" "$$dst"; echo "installed $$dst"; \
	done

clean:
	rm -rf build $(VENV)
