#!/usr/bin/env bash
# Set up (virtualenv + install, if needed), check the import contracts, and run the test suite. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
lego_ensure_venv
lego_ensure_browser
cd "$LEGO_ROOT"
# The import direction first: a broken layer contract fails the run before any test.
"$LEGO_VENV/bin/lint-imports" --no-cache
exec "$LEGO_VENV/bin/python" -m pytest "$@"
