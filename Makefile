# tcpbridge developer entry points. Everything runs from a private venv in .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit clean install install-app install-units install-configs uninstall

$(STAMP): setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,fast,metrics]'
	touch $(STAMP)

## make run: start a frontend+backend pair from conf/ on loopback and show bytes crossing it
run: $(STAMP)
	$(BIN)/python scripts/demo.py --frontend-config conf/frontend.yaml --backend-config conf/backend.yaml

## make test: lint, type-check and the whole test suite
test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check bridge tests scripts

typecheck: $(STAMP)
	$(BIN)/mypy bridge

unit: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## make soak: rounds of tunnels, then 1000 concurrent 1 MiB tunnels, sha256-checked; fds/threads/RSS
## before and after, restart times after SIGKILL (SOAK_ARGS='--rounds 5 --burst 200' for a short one)
.PHONY: soak
soak: $(STAMP)
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

## make bench: tcpbridge vs direct TCP vs a two-hop socat relay on loopback, interleaved rounds: bulk
## throughput, RTT, setup rate, held tunnels, memory and CPU; table + bench/results/latest.{json,png}
## (BENCH_ARGS='--quick' for a smoke test; installs socat with apt-get and matplotlib if missing); then
## bench/cuts.py: a resumable tunnel's pause and replay when its websocket is cut (CUTS_ARGS)
.PHONY: bench
bench: $(STAMP)
	@command -v socat >/dev/null || apt-get install -y socat || (apt-get update && apt-get install -y socat)
	@$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/python -m pip install --quiet 'matplotlib>=3.7'
	$(BIN)/python bench/bench.py $(BENCH_ARGS)
	$(BIN)/python bench/cuts.py $(CUTS_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

## make install: a private venv under $(PREFIX)/lib/tcpbridge, the commands in $(PREFIX)/bin, the
## systemd units in $(UNITDIR) and example configs in /etc/tcpbridge (never overwritten).
## DESTDIR stages the whole tree elsewhere (packaging, tests); nothing installed mentions it.
PREFIX ?= /usr/local
UNITDIR ?= /etc/systemd/system
CONFDIR := /etc/tcpbridge
# The interpreter the installed venv links to: the system one, which the sandboxed units can reach
# (ProtectHome=yes hides an interpreter under /root or /home, e.g. pyenv's).
INSTALL_PYTHON ?= /usr/bin/python3
APPDIR := $(PREFIX)/lib/tcpbridge
APPVENV := $(APPDIR)/venv
COMMANDS := tcpbridge tcpbridge-frontend tcpbridge-backend
UNITS := tcpbridge-frontend.service tcpbridge-backend.service tcpbridge-frontend@.service tcpbridge-backend@.service
CONFIGS := frontend.yaml backend.yaml

install: install-app install-units install-configs
	@echo "installed tcpbridge in $(DESTDIR)$(APPDIR); next: edit $(CONFDIR)/*.yaml, then" \
		"systemctl enable --now tcpbridge-backend (and/or tcpbridge-frontend)"

# The venv is built in $(DESTDIR) but must work once moved to $(PREFIX).
install-app:
	rm -rf '$(DESTDIR)$(APPVENV)'
	$(INSTALL_PYTHON) -m venv '$(DESTDIR)$(APPVENV)'
	@# Built from a copy, so the source tree gets no build/ or egg-info from it.
	src=$$(mktemp -d) && trap 'rm -rf "$$src"' EXIT && \
		cp -R setup.py setup.cfg pyproject.toml README.md bridge "$$src/" && \
		'$(DESTDIR)$(APPVENV)/bin/python' -m pip install --quiet --disable-pip-version-check --no-compile "$$src[fast,metrics]"
	@# Scripts, activate files and pyvenv.cfg name the venv by its staging path: point them at $(PREFIX).
	@if [ -n '$(DESTDIR)' ]; then \
		grep -rlIZF -- '$(DESTDIR)$(APPVENV)' '$(DESTDIR)$(APPVENV)' | \
			xargs -0 -r sed -i 's|$(DESTDIR)$(APPVENV)|$(APPVENV)|g'; \
	fi
	@# Bytecode records source paths too (for tracebacks): compile it all as if in $(PREFIX).
	'$(DESTDIR)$(APPVENV)/bin/python' -m compileall -q -f -j 0 -d '$(APPVENV)/lib' '$(DESTDIR)$(APPVENV)/lib'
	install -d -m 0755 '$(DESTDIR)$(PREFIX)/bin'
	for cmd in $(COMMANDS); do ln -sfn "../lib/tcpbridge/venv/bin/$$cmd" "$(DESTDIR)$(PREFIX)/bin/$$cmd"; done

install-units:
	install -d -m 0755 '$(DESTDIR)$(UNITDIR)'
	for unit in $(UNITS); do \
		sed 's|/usr/local/bin/|$(PREFIX)/bin/|g' "systemd/$$unit" > "$(DESTDIR)$(UNITDIR)/$$unit.tmp" && \
		chmod 0644 "$(DESTDIR)$(UNITDIR)/$$unit.tmp" && \
		mv -f "$(DESTDIR)$(UNITDIR)/$$unit.tmp" "$(DESTDIR)$(UNITDIR)/$$unit"; \
	done
	@if [ -z '$(DESTDIR)' ] && [ -d /run/systemd/system ]; then \
		echo systemctl daemon-reload; systemctl daemon-reload; \
	fi

# Never overwrites: the files there are the user's. Readable by all, because the units'
# DynamicUser= account has no fixed uid or group to grant access to.
install-configs:
	install -d -m 0755 '$(DESTDIR)$(CONFDIR)'
	@for conf in $(CONFIGS); do \
		if [ -e "$(DESTDIR)$(CONFDIR)/$$conf" ]; then \
			echo "keeping existing $(DESTDIR)$(CONFDIR)/$$conf (the new example is conf/$$conf)"; \
		else \
			install -m 0644 "conf/$$conf" "$(DESTDIR)$(CONFDIR)/$$conf" && echo "installed $(DESTDIR)$(CONFDIR)/$$conf"; \
		fi; \
	done

## make uninstall: remove what make install added, except the configs in /etc/tcpbridge
uninstall:
	@if [ -z '$(DESTDIR)' ] && [ -d /run/systemd/system ]; then \
		echo "stopping and disabling tcpbridge units"; \
		systemctl disable --now tcpbridge-frontend.service tcpbridge-backend.service || true; \
		systemctl stop 'tcpbridge-frontend@*.service' 'tcpbridge-backend@*.service' || true; \
	fi
	@# Enablement links (of template instances too) that would dangle once the units are gone.
	@if [ -d '$(DESTDIR)$(UNITDIR)' ]; then \
		find '$(DESTDIR)$(UNITDIR)' -path '*.wants/*' -type l \
			\( -name 'tcpbridge-frontend*.service' -o -name 'tcpbridge-backend*.service' \) -print -delete; \
	fi
	for unit in $(UNITS); do rm -f "$(DESTDIR)$(UNITDIR)/$$unit"; done
	for cmd in $(COMMANDS); do rm -f "$(DESTDIR)$(PREFIX)/bin/$$cmd"; done
	rm -rf '$(DESTDIR)$(APPDIR)'
	@if [ -z '$(DESTDIR)' ] && [ -d /run/systemd/system ]; then \
		echo systemctl daemon-reload; systemctl daemon-reload; \
	fi
	@echo "left $(DESTDIR)$(CONFDIR)/ in place: it holds configuration you may have edited" \
		"(and drop-ins from systemctl edit stay in $(DESTDIR)$(UNITDIR)/tcpbridge-*.d/); remove them by hand if unwanted"
