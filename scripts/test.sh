#!/usr/bin/env bash
# Run the test suite (creates ./.venv with the tested versions on first use).
source "$(dirname "$0")/venv.sh"
exec python -m pytest "$@"
