# Install wfd as a systemd service; systemd/README.md explains each step.
# `sudo make install` installs or upgrades, `sudo make uninstall` removes the
# program and keeps the data. The directories can be overridden for a dry
# run elsewhere, e.g. `make install PREFIX=/tmp/wfd UNIT_DIR=/tmp/units`.

PREFIX      ?= /opt/wfd
CONFIG_DIR  ?= /etc/wfd
UNIT_DIR    ?= /etc/systemd/system
BIN_DIR     ?= /usr/local/bin
PROFILE_DIR ?= /etc/profile.d
PYTHON      ?= python3

VENV := $(PREFIX)/venv
# systemd is the running init system: the same test as sd_booted(3).
SYSTEMD := $(wildcard /run/systemd/system)

.PHONY: install uninstall verify-unit system-deps run stop test test-fast lint bench check-v2

# -- development ---------------------------------------------------------------
# `make run` sets up .venv and starts a local daemon with an example workflow;
# `make test` runs the whole suite (what CI runs); `make test-fast` only the
# unit layer (tests/unit: no daemon, no child process), in seconds.

DEV_VENV := .venv

$(DEV_VENV)/.installed: pyproject.toml
	test -x $(DEV_VENV)/bin/python || $(PYTHON) -m venv $(DEV_VENV)
	$(DEV_VENV)/bin/pip install --quiet --upgrade pip
	$(DEV_VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

# Executions run under bubblewrap (isolation = "strict"); setpriv and nsenter are
# util-linux; pasta (passt) and ip (iproute2) give each its network namespace;
# mkfs.ext4 (e2fsprogs) and mount make the workflows' size-capped directories.
system-deps:
	@command -v bwrap >/dev/null && command -v setpriv >/dev/null && command -v curl >/dev/null \
	&& command -v pasta >/dev/null && command -v ip >/dev/null && command -v nsenter >/dev/null \
	&& command -v mkfs.ext4 >/dev/null \
	|| if [ "$$(id -u)" = 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap util-linux curl \
			passt iproute2 e2fsprogs mount >/dev/null; \
	else \
		echo "wfd needs bubblewrap, util-linux, passt, iproute2, e2fsprogs and curl:" \
			"sudo apt-get install bubblewrap util-linux passt iproute2 e2fsprogs curl" >&2; \
		exit 1; \
	fi

run: system-deps $(DEV_VENV)/.installed
	examples/demo.sh

stop:
	-test -f wfd-data/wfd.pid && kill $$(cat wfd-data/wfd.pid) && rm -f wfd-data/wfd.pid

test: system-deps $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/python -m pytest -q

test-fast: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/python -m pytest -q tests/unit

lint: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/ruff check .
	$(DEV_VENV)/bin/mypy

# wfd.service on a cgroup v2 kernel with controllers, in a qemu guest (.ci/check-v2
# says how; several minutes without KVM, so not part of CI). Needs root.
check-v2: $(DEV_VENV)/.installed
	.ci/check-v2

bench: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/python bench/bench_timers.py
	$(DEV_VENV)/bin/python bench/bench_scheduler.py
	$(DEV_VENV)/bin/python bench/bench_retention.py
	$(DEV_VENV)/bin/python bench/bench_executors.py
	$(DEV_VENV)/bin/python bench/bench_stages.py
	$(DEV_VENV)/bin/python bench/bench_process_shapes.py
	$(DEV_VENV)/bin/python bench/bench_delivery.py
	$(DEV_VENV)/bin/python bench/bench_leaks.py -n 200
	$(DEV_VENV)/bin/python bench/bench_hostile.py
	$(DEV_VENV)/bin/python bench/bench_environments.py

# -- installing as a service -----------------------------------------------------

# Safe to run again to upgrade: an existing config is the operator's and is
# never overwritten, and the service is restarted (not just started) so the
# new code is loaded.
install:
	@test "$$(id -u)" = 0 || { echo "make install: run as root" >&2; exit 1; }
	getent group wfd >/dev/null || groupadd --system wfd
	getent passwd wfd >/dev/null || useradd --system --gid wfd --home-dir /var/lib/wfd \
		--no-create-home --shell /usr/sbin/nologin wfd
	@# umask 022: user wfd must read the venv even where root's umask is 077.
	umask 022 && { test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV); }
	umask 022 && $(VENV)/bin/pip install --quiet $(CURDIR)
	install -m 0644 systemd/README.md $(PREFIX)/README.md
	install -D -m 0755 systemd/delegate-cgroup-v1 $(PREFIX)/libexec/delegate-cgroup-v1
	ln -sf $(VENV)/bin/wfd $(BIN_DIR)/wfd
	echo 'export WFD_SOCKET=/run/wfd/wfd.sock' > $(PROFILE_DIR)/wfd.sh
	install -D -m 0644 systemd/wfd.service $(UNIT_DIR)/wfd.service
	install -d -m 0755 $(CONFIG_DIR)
	test -e $(CONFIG_DIR)/wfd.toml || \
		install -m 0640 -g wfd systemd/wfd.toml $(CONFIG_DIR)/wfd.toml
ifneq ($(SYSTEMD),)
	systemctl daemon-reload
	systemctl enable wfd
	systemctl restart wfd
else
	@echo "systemd is not running here; on a systemd host install would now run:"
	@echo "  systemctl daemon-reload && systemctl enable wfd && systemctl restart wfd"
endif

uninstall:
	@test "$$(id -u)" = 0 || { echo "make uninstall: run as root" >&2; exit 1; }
ifneq ($(SYSTEMD),)
	! systemctl cat wfd >/dev/null 2>&1 || systemctl disable --now wfd
endif
	rm -f $(UNIT_DIR)/wfd.service $(BIN_DIR)/wfd $(PROFILE_DIR)/wfd.sh
ifneq ($(SYSTEMD),)
	systemctl daemon-reload
endif
	rm -rf $(PREFIX)
	@echo "Kept /var/lib/wfd (workflows, versions, settings, executions), $(CONFIG_DIR)"
	@echo "and user wfd. Remove them only once nothing there is needed:"
	@echo "  rm -rf /var/lib/wfd $(CONFIG_DIR) && userdel wfd"

# verify needs the Exec binaries to exist: check a copy pointed at /bin/true and
# at the checkout's delegate-cgroup-v1.
# verify exits 0 even for unknown keys, so any message it prints fails here.
verify-unit:
	@tmp=$$(mktemp -d) && \
	sed -e 's#^ExecStart=/opt/wfd/venv/bin/wfd#ExecStart=/bin/true#' \
		-e 's#^ExecStartPre=+/opt/wfd/libexec/#ExecStartPre=+$(CURDIR)/systemd/#' \
		systemd/wfd.service \
		> $$tmp/wfd.service && \
	messages=$$(systemd-analyze verify $$tmp/wfd.service 2>&1); status=$$?; \
	if [ -n "$$messages" ]; then echo "$$messages" >&2; status=1; fi; \
	systemd-analyze security --offline=yes $$tmp/wfd.service | tail -n 1; \
	rm -rf $$tmp; exit $$status
