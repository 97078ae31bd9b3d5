# damselfly: the two commands a user needs are `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

# Root's tools (mkfs.ext4, losetup, runc, debugfs) live in /usr/sbin and /sbin, which a plain `su` or a
# chroot shell may leave off PATH; the tests and the demo call them by name.
export PATH := $(PATH)$(if $(filter /usr/sbin,$(subst :, ,$(PATH))),,:/usr/sbin:/sbin)

.PHONY: install install-system test lint bench demo clean proto

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# damselfly on this machine, for systemd (docs/operations.md): a release virtualenv under $(PREFIX), the
# `damselfly` link the unit's ExecStart names, the unit, a sample config if none. Again = an upgrade.
# PREFIX, BINDIR, UNITDIR, CONFDIR move it (a test installs into a temporary directory).
install-system:
	$(PY) scripts/install_system.py

# Both `test` and `demo` first install what they need from Debian (scripts/system_deps.sh, as root;
# nothing, and no network, when all is there), then the venv (`install` needs python3-venv).
test:
	@scripts/system_deps.sh test
	@$(MAKE) --no-print-directory install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check blockformat p2p snapshotter tests scripts
	$(BIN)/ruff format --check blockformat p2p snapshotter tests scripts
	$(BIN)/mypy

bench: install
	$(BIN)/python scripts/bench_blockformat.py
	$(BIN)/python scripts/bench_fetch.py
	$(BIN)/python scripts/bench_device.py --profile
	$(BIN)/python scripts/bench_convert.py
	$(BIN)/python scripts/bench_p2p.py
	$(BIN)/python scripts/bench_coldstart.py

# The end-to-end demo (scripts/demo.py): as root; DEMO_SMALL=1 for the small (busybox) image.
demo:
	@scripts/system_deps.sh demo
	@$(MAKE) --no-print-directory install
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# Python modules for proto/ (containerd's API and CRI's image service, wire-compatible), checked in
# under snapshotter/api/.
PROTOS := $(shell find proto -name '*.proto' | sort)
PROTO_PACKAGES := containerd runtime
proto: install
	cd snapshotter/api && rm -rf $(PROTO_PACKAGES)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=snapshotter/api --pyi_out=snapshotter/api \
		--grpc_python_out=snapshotter/api $(PROTOS)
	cd snapshotter/api && find $(PROTO_PACKAGES) -type d -exec touch {}/__init__.py \;
	cd snapshotter/api && find $(PROTO_PACKAGES) -name '*.py' -o -name '*.pyi' | \
		xargs sed -i -E 's/^from (containerd|runtime)\./from snapshotter.api.\1./'
