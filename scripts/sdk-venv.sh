#!/usr/bin/env bash
# Makes the Python venv the SDRS tests drive blockrep's REST API with: the public OTC SDK
# (otcextensions, from PyPI) in target/sdk-venv. Idempotent: does nothing when the venv
# already holds that version.
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.34.8
venv=target/sdk-venv
if "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('otcextensions') != '$version')" 2>/dev/null; then
    exit 0
fi
echo "sdk-venv: installing otcextensions $version into $venv" >&2
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "otcextensions==$version"
