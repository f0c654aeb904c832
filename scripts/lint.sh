#!/usr/bin/env bash
# ruff and mypy over the library and the connectors, settings in pyproject.toml; any finding fails.
# mypy cannot follow the editable install to `tierkv_connectors`, so build/mypy/tierkv_connectors
# links connectors/ under its installed name (see [tool.mypy]).
set -uo pipefail
cd "$(dirname "$0")/.."
rc=0
echo "+ ruff check tierkv connectors"
ruff check tierkv connectors || rc=1
mkdir -p build/mypy && ln -sfn ../../connectors build/mypy/tierkv_connectors
echo "+ mypy"
mypy || rc=1
[ "$rc" -eq 0 ] || echo "lint failed: fix the findings above" >&2
exit "$rc"
