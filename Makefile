# The two commands a fresh machine needs: `make run` boots the default guest, `make test` runs
# the tests. Both create the virtual environment and install what is missing first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PKGS := qemu-system-x86 acpica-tools gcc binutils debootstrap

.PHONY: run test bench fuzz host-deps clean

$(STAMP): pyproject.toml setup.py src/corral/devices/virtio/_fastring.c src/corral/vstate/_exitloop.c  # the extensions build in place
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

host-deps:
	@missing=""; \
	command -v qemu-system-x86_64 >/dev/null || missing="$$missing qemu-system-x86"; \
	command -v iasl >/dev/null || missing="$$missing acpica-tools"; \
	command -v gcc >/dev/null || missing="$$missing gcc"; \
	command -v ld >/dev/null || missing="$$missing binutils"; \
	command -v debootstrap >/dev/null || test -x /usr/sbin/debootstrap || missing="$$missing debootstrap"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@# what only some tests use (they skip without it): installed when apt can, never fatal
	@optional=""; \
	command -v dmidecode >/dev/null || test -x /usr/sbin/dmidecode || optional="$$optional dmidecode"; \
	command -v cpio >/dev/null || optional="$$optional cpio"; \
	if [ -n "$$optional" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$optional >/dev/null 2>&1 \
	    || echo "could not install$$optional: the tests that use them skip"; \
	fi

# The sources' bytecode first, as a wheel's install writes it: an editable install under
# PYTHONDONTWRITEBYTECODE would otherwise compile cli.py and the rest again at every launch.
run: $(STAMP)
	$(BIN)/python -m compileall -q src/corral
	$(BIN)/corral run $(ARGS)

test: host-deps $(STAMP)
	CORRAL_LAB=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: host-deps $(STAMP)
	$(BIN)/python bench/probe_bench.py $(ARGS)

clean:
	rm -rf $(VENV) build src/corral/guest/build src/corral/devices/virtio/_fastring.*.so src/corral/vstate/_exitloop.*.so

# The lab: a QEMU TCG VM with emulated AMD SVM in which corral runs on a real /dev/kvm (tests/lab).
.PHONY: lab
lab: host-deps $(STAMP)
	$(BIN)/python -m pytest tests/lab -m lab $(PYTEST_ARGS)

# the fuzz campaign (~10 minutes): every device and parser under hypothesis, the parsers under
# atheris too (installed here if missing), a table of inputs run per target
fuzz: $(STAMP)
	$(BIN)/python -c "import atheris" 2>/dev/null || $(BIN)/pip install -q atheris || echo "atheris did not install: hypothesis only"
	$(BIN)/python bench/fuzz_campaign.py $(ARGS)
