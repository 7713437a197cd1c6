# shadowplex developer entry points. Every target is idempotent.
#   make demo    run the main job (installs what it needs first)
#   make test    run the test suite (installs what it needs first); PYTEST_ARGS="-k foo -x"
#   make setup   apt packages (only if missing) + .venv (only if pyproject.toml changed)
#   make ceph    Ceph's packages + rados/rbd linked into .venv (the RBD backend and its
#                tests; `make test` runs it, `make setup` does not: see docs/ceph.md)
#   make install the service: a venv at $(PREFIX) (/opt/shadowplex), the command written
#                into $(BINDIR) (/usr/local/bin, where contrib/shadowplex.service's
#                ExecStart looks), the unit, the example config (never overwritten), the
#                bash completion, the man pages (contrib/man: shadowplex(1) and one page
#                per command, into $(MANDIR)/man1). `make uninstall` removes them, the
#                config excepted.

SHELL := /bin/bash
.NOTPARALLEL:
.DEFAULT_GOAL := test

PYTHON      ?= python3
VENV        := .venv
VPY         := $(VENV)/bin/python
STAMP       := $(VENV)/.shadowplex-installed
PYTEST_ARGS ?=
PACKAGES    := blockstore provider fuse_mount nbd tools rbdarray
# The editable install maps top-level packages found at install time, so a package that
# appears later (its __init__.py is newer than the stamp) triggers one re-install.
PKG_INITS   := $(wildcard $(addsuffix /__init__.py,$(PACKAGES)))
# pyfuse3 3.5.0 is built from its sdist with our patches (fuse_mount/patches/*.patch):
# a changed patch, build script or build pin re-runs the venv recipe, which rebuilds it.
PYFUSE3_BUILD := fuse_mount/patches/build-pyfuse3.sh
PYFUSE3_DEPS  := $(PYFUSE3_BUILD) $(wildcard fuse_mount/patches/*.patch) \
                 fuse_mount/patches/pyfuse3-build-constraints.txt

APT_PACKAGES := fuse3 libfuse3-dev pkg-config e2fsprogs util-linux xfsprogs btrfs-progs fio \
                qemu-system-common qemu-utils sqlite3 gcc python3-dev python3-venv patch \
                libnbd-bin nbdkit iproute2 man-db groff-base

export DEBIAN_FRONTEND := noninteractive

# make install's destinations (override on the command line: make install PREFIX=...)
PREFIX        ?= /opt/shadowplex
BINDIR        ?= /usr/local/bin
UNITDIR       ?= /etc/systemd/system
CONFDIR       ?= /etc/shadowplex
COMPLETIONDIR ?= /usr/share/bash-completion/completions
MANDIR        ?= /usr/local/share/man
# the pages shipped (generated from the parser: python -m tools.manpages contrib/man)
MANPAGES      := $(notdir $(wildcard contrib/man/*.1))

.PHONY: setup setup-system venv ceph ceph-system test demo lint typecheck clean install uninstall \
        install-man uninstall-man

setup: setup-system venv

# Installs only the packages dpkg does not report as installed; apt-get update only if needed.
setup-system:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
	  dpkg -s "$$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "setup-system: installing:$$missing"; \
	  if [ "$$(id -u)" -eq 0 ]; then sudo=""; \
	  elif command -v sudo >/dev/null; then sudo="sudo -n"; \
	  else echo "setup-system: need root (or sudo) to install:$$missing" >&2; exit 1; fi; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

venv: $(STAMP)

# Re-runs only when pyproject.toml, a top-level __init__.py or the pyfuse3 patch/build
# files are newer than the stamp. The patched pyfuse3 goes in first (its version,
# 3.5.0+shadowplex.<patch hash>, satisfies pyproject's pyfuse3==3.5.0, so the editable
# install keeps it), and is checked again after: a failed build or a pip that swapped it
# for the unpatched release fails here, never silently.
$(STAMP): pyproject.toml $(PKG_INITS) $(PYFUSE3_DEPS)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "venv: '$(PYTHON)' is $$($(PYTHON) -V 2>&1 || echo missing); shadowplex needs Python >= 3.11." \
	       "Put one first on PATH or run: make PYTHON=/path/to/python3.11 setup" >&2; exit 1; }
	@if ! $(VPY) -c 'import sys, pip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
	  echo "venv: creating $(VENV) with $$($(PYTHON) -V 2>&1)"; \
	  rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); \
	fi
	$(VPY) -m pip install -q --upgrade pip
	bash $(PYFUSE3_BUILD) $(VPY) build/pyfuse3
	$(VPY) -m pip install -q -e '.[dev]'
	bash $(PYFUSE3_BUILD) --check $(VPY)
	@touch $@

# Ceph RBD (rbdarray/setup-ceph.sh): ceph-mon, ceph-osd, python3-rados, python3-rbd, then
# the two extension modules symlinked into the venv. Without root or the packages it says
# why and the RBD tests skip; with SHADOWPLEX_REQUIRE_KERNEL=1 (CI) that is a failure.
ceph: ceph-system venv
	bash rbdarray/setup-ceph.sh link $(VPY)

ceph-system:
	bash rbdarray/setup-ceph.sh system

test: setup ceph
	$(VPY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/shadowplex demo

# A venv of its own (not the system Python: Debian's is externally managed, and the
# patched pyfuse3 must not replace a system one): the patched pyfuse3 first, then
# shadowplex itself, not editable (this checkout may go away). Re-running upgrades it.
# The unit's ExecStart is rewritten if BINDIR is not /usr/local/bin.
install: setup-system install-man
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "install: '$(PYTHON)' is $$($(PYTHON) -V 2>&1 || echo missing); shadowplex needs" \
	       "Python >= 3.11: make PYTHON=/path/to/python3.11 install" >&2; exit 1; }
	@if ! $(PREFIX)/bin/python -c 'import sys, pip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
	  echo "install: creating the venv $(PREFIX)"; $(PYTHON) -m venv $(PREFIX); \
	fi
	$(PREFIX)/bin/python -m pip install -q --upgrade pip
	bash $(PYFUSE3_BUILD) $(PREFIX)/bin/python build/pyfuse3
	$(PREFIX)/bin/python -m pip install -q .
	bash $(PYFUSE3_BUILD) --check $(PREFIX)/bin/python
	install -d $(BINDIR)
	@# the command: the venv's Python started without site (-IS), sys.path set by the file
	@# itself (tools/launcher.py; docs/performance.md "The CLI's start-up")
	$(PREFIX)/bin/python -m tools.launcher $(BINDIR)/shadowplex
	install -d $(UNITDIR)
	sed 's#/usr/local/bin/shadowplex#$(BINDIR)/shadowplex#' contrib/shadowplex.service \
	  > $(UNITDIR)/shadowplex.service && chmod 644 $(UNITDIR)/shadowplex.service
	@if [ -e $(CONFDIR)/shadowplex.toml ]; then \
	  echo "install: keeping $(CONFDIR)/shadowplex.toml (the new example: contrib/shadowplex.toml)"; \
	else install -D -m 644 contrib/shadowplex.toml $(CONFDIR)/shadowplex.toml; fi
	install -D -m 644 contrib/shadowplex.bash-completion $(COMPLETIONDIR)/shadowplex
	@if command -v systemd-analyze >/dev/null; then \
	  systemd-analyze verify $(UNITDIR)/shadowplex.service && echo "install: the unit verifies"; \
	fi
	@$(BINDIR)/shadowplex --version
	@echo "install: next: edit $(CONFDIR)/shadowplex.toml; shadowplex pool init POOL;" \
	      "mkdir -p MOUNT; systemctl daemon-reload && systemctl enable --now shadowplex"

uninstall: uninstall-man
	rm -f $(BINDIR)/shadowplex $(UNITDIR)/shadowplex.service $(COMPLETIONDIR)/shadowplex
	rm -rf $(PREFIX)
	@echo "uninstall: kept $(CONFDIR) and every pool"

# man finds them in $(MANDIR) at once; apropos/whatis after the next mandb run
install-man:
	install -d $(MANDIR)/man1
	install -m 644 $(addprefix contrib/man/,$(MANPAGES)) $(MANDIR)/man1/

uninstall-man:
	rm -f $(addprefix $(MANDIR)/man1/,$(MANPAGES))

lint: venv
	$(VENV)/bin/ruff check .

typecheck: venv
	$(VENV)/bin/mypy

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache .mypy_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
