#!/usr/bin/env bash
# Installs what building, testing, the demo and the benchmarks need. Idempotent: does
# nothing when every tool is already there.
set -euo pipefail

# tool -> Debian package
declare -A packages=(
    [fio]=fio
    [nbdkit]=nbdkit
    [nbdinfo]=libnbd-bin
    [nbdcopy]=libnbd-bin
    [nbdfuse]=libnbd-bin
    [nbdsh]=python3-libnbd
    [qemu-io]=qemu-utils
    [protoc]=protobuf-compiler
    [fusermount3]=fuse3
    [mkfs.ext4]=e2fsprogs
    [losetup]=mount
    [sha256sum]=coreutils
    [dpkg-deb]=dpkg
    [groupadd]=passwd
    [setpriv]=util-linux
    [nft]=nftables
    [ip]=iproute2
    # The HA coordinator's store (its tests start three members on loopback).
    [etcd]=etcd-server
    # The REST API's tests: curl, and a venv for the OTC SDK (scripts/sdk-venv.sh).
    [curl]=curl
    [python3]=python3
    # The daemon's allocator (jemalloc) is built from C with make.
    [make]=make
    [cc]=gcc
)

missing=()
for tool in "${!packages[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${packages[$tool]}")
done
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
# protoc's well-known types (etcd-client's protos import them); only recommended by
# protobuf-compiler, so not installed with it here.
[[ -e /usr/include/google/protobuf/descriptor.proto ]] || missing+=(libprotobuf-dev)
if ((${#missing[@]})); then
    mapfile -t wanted < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "install-deps: installing ${wanted[*]}" >&2
    if [[ $(id -u) -ne 0 ]]; then
        echo "install-deps: need root to apt-get install ${wanted[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Another apt (unattended upgrades, a parallel job) may hold the locks: wait for it
    # rather than fail. DPkg::Lock::Timeout covers the dpkg lock; the package lists' lock
    # is retried here.
    apt_wait=(-o DPkg::Lock::Timeout=600)
    for attempt in $(seq 60); do
        if apt-get "${apt_wait[@]}" update -qq 2>"${TMPDIR:-/tmp}/install-deps.err"; then
            break
        fi
        if ! grep -q "Could not get lock" "${TMPDIR:-/tmp}/install-deps.err" || ((attempt == 60)); then
            cat "${TMPDIR:-/tmp}/install-deps.err" >&2
            exit 1
        fi
        echo "install-deps: apt is busy; waiting for its lock" >&2
        sleep 10
    done
    apt-get "${apt_wait[@]}" install -y -qq --no-install-recommends "${wanted[@]}" >/dev/null
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "install-deps: installing cargo-nextest" >&2
    cargo install --locked cargo-nextest
fi
# The Debian package (scripts/package.sh, and its test).
if ! cargo deb --version >/dev/null 2>&1; then
    echo "install-deps: installing cargo-deb" >&2
    cargo install --locked cargo-deb --version 3.8.0
fi
