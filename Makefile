# Ferry: the two commands are `make demo` and `make test`; they set up
# everything they need on a fresh Debian machine (as root).

SHELL        := /bin/bash
.SHELLFLAGS  := -eo pipefail -c

CARGO     ?= cargo
FERRY     := target/release/ferry
GUEST     := target/guest/ferry-guest.elf
LINUX_DIR := target/linux

export FERRY_BIN       := $(CURDIR)/$(FERRY)
export FERRY_GUEST     := $(CURDIR)/$(GUEST)
export FERRY_LINUX_DIR := $(CURDIR)/$(LINUX_DIR)

.PHONY: all deps build guest linux test demo demo-migrate bench bench-qemu fuzz fuzz-cmin lint fmt clean

all: build guest

## deps: Debian packages the tests and the demo use (lz4, iproute2, util-linux, qemu-utils, acpica-tools, etcd-server, protobuf-compiler, nftables, python3)
deps:
	@scripts/install-deps.sh

## build: the ferry binary and the test/bench helpers
build:
	$(CARGO) build --release --workspace --bins

## guest: the bundled test guest, target/guest/ferry-guest.elf
guest:
	cd guest && CARGO_TARGET_DIR=target $(CARGO) build --release
	@mkdir -p target/guest
	cp guest/target/release/ferry-guest $(GUEST)

## linux: Debian's cloud kernel, for the Linux smoke test (fetched, not built)
linux: deps
	scripts/fetch-linux.sh $(LINUX_DIR)

## test: unit and end-to-end tests on real /dev/kvm
test: deps build guest linux
	@mkdir -p target
	$(CARGO) test --release --workspace --no-fail-fast 2>&1 | tee target/test.log
	@scripts/test-summary.sh target/test.log

## demo: a 3-node lab cluster on etcd: VMs pinged from the client, node a drained and resumed with failback, figures printed
demo: deps build guest
	scripts/demo-cluster.sh

## demo-migrate: two lab hosts, one guest live-migrated a -> b -> a while pinged, figures printed
demo-migrate: deps build guest
	scripts/demo.sh

## bench: figures as JSON under target/bench/
bench: deps build guest
	@mkdir -p target/bench
	$(CARGO) run --release -q -p ferry-e2e --bin bench-boot -- target/bench/boot.json
	$(CARGO) run --release -q -p ferry-e2e --bin bench-net -- target/bench/net.json
	$(CARGO) run --release -q -p ferry-e2e --bin bench-live -- target/bench/live.json
	$(CARGO) run --release -q -p ferry-e2e --bin bench-dirty -- target/bench/dirty.json
	$(CARGO) run --release -q -p ferry-e2e --bin bench-storage -- target/bench/storage.json
	$(CARGO) run --release -q -p ferry-e2e --bin bench-quick -- target/bench/quick.json
	$(CARGO) run --release -q -p ferry-e2e --bin bench-soak -- target/bench/soak.json
	$(CARGO) run --release -q -p ferry-e2e --bin bench-cluster -- target/bench/cluster.json
	$(CARGO) run --release -q -p ferry-e2e --bin bench-failover -- target/bench/failover.json

## bench-qemu: Ferry against QEMU 7.2 (Debian's, -M microvm, unpacked beside the newer qemu-utils if need be) in one run: the same guest, lab, pinger and 20 ms downtime target, 1 GiB idle and at 50 MiB/s and 4 GiB idle, medians of 3; target/bench/qemu.json with the ratios (not part of `make bench`)
bench-qemu: deps build guest
	@mkdir -p target/bench
	qemu=$$(scripts/install-qemu.sh | tail -1) && \
	FERRY_QEMU=$$(realpath "$$qemu") $(CARGO) run --release -q -p ferry-e2e --bin bench-qemu -- target/bench/qemu.json

## fuzz: every cargo-fuzz target for FUZZ_SECONDS (default 60) each, on fuzz/corpus/ (needs nightly)
fuzz:
	FUZZ_SECONDS=$${FUZZ_SECONDS:-60} scripts/fuzz.sh

## fuzz-cmin: shrink each fuzz/corpus/<target>/ to what adds coverage, keeping named inputs (needs nightly)
fuzz-cmin:
	scripts/fuzz-cmin.sh

lint:
	$(CARGO) fmt --all --check
	cd guest && $(CARGO) fmt --check
	$(CARGO) clippy --all-targets --workspace -- -D warnings
	cd guest && $(CARGO) clippy --release -- -D warnings

fmt:
	$(CARGO) fmt --all
	cd guest && $(CARGO) fmt

clean:
	$(CARGO) clean
	cd guest && $(CARGO) clean
