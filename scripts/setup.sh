#!/usr/bin/env bash
# Create .venv (once) and install the requirements. The embedded model is fetched on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --disable-pip-version-check -r requirements.txt
