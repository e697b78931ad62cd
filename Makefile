# `make demo`: the whole pipeline without Nix on Debian 12 (as root). Installs the Debian packages and a
# Python venv, builds a hybrid (BIOS + UEFI) image of the fixture system (Debian parts shaped like a
# NixOS system; it is not NixOS) with `python -m builder build`, then boots it under qemu (TCG), first
# with SeaBIOS (GRUB), then with OVMF (systemd-boot), showing the serial console.

VENV ?= $(CURDIR)/.venv
DEMO ?= $(CURDIR)/.demo
PY := $(VENV)/bin/python
IMAGE := $(DEMO)/out/fixture.img
QEMU := qemu-system-x86_64 -accel tcg -machine q35 -m 512 -display none -monitor none -serial stdio -no-reboot
OVMF_CODE := /usr/share/OVMF/OVMF_CODE_4M.fd
OVMF_VARS := /usr/share/OVMF/OVMF_VARS_4M.fd

.PHONY: demo deps demo-image demo-boot-bios demo-boot-uefi demo-clean check

# The fast loop while developing (about two minutes): ruff, mypy --strict and every test not marked slow
# or boot, with the Python that has '.[test]' installed (CHECK_PY; default: python on PATH). CI runs all
# of them (.ci/run).
CHECK_PY ?= python
check:
	$(CHECK_PY) -m pytest -q -p no:cacheprovider -m "not slow and not boot" tests

demo: demo-image demo-boot-bios demo-boot-uefi
	@echo "demo: $(IMAGE) booted with SeaBIOS (GRUB) and OVMF (systemd-boot)"

$(DEMO)/.deps:
	bash .ci/install-deps
	mkdir -p $(DEMO) && touch $@

$(PY): $(DEMO)/.deps
	/usr/bin/python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e .

deps: $(PY)

demo-image: $(PY)
	rm -rf $(DEMO)/system $(DEMO)/out
	$(PY) -c 'import sys; from pathlib import Path; from tests.fixtures.system import fixture_system_spec; \
	  print("spec:", fixture_system_spec(Path(sys.argv[1]), "hybrid"))' $(DEMO)/system
	$(PY) -m builder build $(DEMO)/system/spec.json --out $(DEMO)/out

demo-boot-bios:
	@echo "=== booting $(IMAGE) with SeaBIOS (GRUB from the MBR and the BIOS boot partition) ==="
	$(QEMU) -drive file=$(IMAGE),if=virtio,format=raw,snapshot=on

demo-boot-uefi:
	@echo "=== booting $(IMAGE) with OVMF (systemd-boot from the ESP) ==="
	cp $(OVMF_VARS) $(DEMO)/ovmf-vars.fd
	$(QEMU) -drive if=pflash,format=raw,unit=0,readonly=on,file=$(OVMF_CODE) \
	  -drive if=pflash,format=raw,unit=1,file=$(DEMO)/ovmf-vars.fd \
	  -drive file=$(IMAGE),if=virtio,format=raw,snapshot=on

demo-clean:
	rm -rf $(DEMO) $(VENV)
