#!/usr/bin/env bash
# Builds the Debian package: target/debian/blockrep_<version>_<arch>.deb with blockrepd and
# blockrep in /usr/bin, the systemd unit, a commented /etc/blockrep/blockrepd.toml (a
# conffile) and the docs; installing it creates the `blockrep` group that may use the
# control socket.
#   scripts/package.sh                 release build
#   scripts/package.sh --profile dev   from the debug build (what the package test uses)
#   scripts/package.sh --out DIR       write the .deb into DIR
#   scripts/package.sh --no-build      package the binaries already built (the test suite's:
#                                      rebuilding them would replace its test-only build)
# Prints the path of the package it wrote.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
out=""
build=yes
while (($#)); do
    case $1 in
        --profile) profile=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --no-build) build=no; shift ;;
        *) echo "package.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

scripts/install-deps.sh
if [[ $build == yes ]]; then
    cargo build --locked --profile "$profile" --bins >&2
fi
args=(-p blockrepd --no-build --locked --profile "$profile")
if [[ -n $out ]]; then
    mkdir -p "$out"
    args+=(--output "$out")
fi
cargo deb "${args[@]}" | tail -n 1
