#!/usr/bin/env bash
# What CI does with every submission: clone the committed tree (nothing uncommitted, no
# .venv) into a temp dir and run `make test` there, so an install step that only worked
# because of something already in this checkout fails here first.
set -euo pipefail
src="$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
dir="$(mktemp -d)"
git clone -q "$src" "$dir/x"
cd "$dir/x"
echo "fresh clone of $(git rev-parse --short HEAD) in $dir/x"
time make test
