#!/usr/bin/env bash
# make gpu-wheels: download the wheels of scripts/gpu-wheels.txt for the GPU machine (Python 3.12,
# manylinux x86-64, no dependencies) into DIR (default .whl, git-ignored). A package published only as a
# source archive (antlr4-python3-runtime) is built here into a wheel, which must come out pure Python.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mkdir -p "$DIR"
grep -Ev '^\s*(#|$)' scripts/gpu-wheels.txt | while read -r req; do
    if "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${PLATFORMS[@]}" -d "$DIR" "$req" 2>/dev/null; then
        echo "downloaded $req"
    else
        "$PY" -m pip wheel -q --no-deps -w "$DIR" "$req"
        name=${req%%==*}
        if ! ls "$DIR"/"${name//-/_}"-*-py3-none-any.whl >/dev/null 2>&1; then
            echo "error: $req has no wheel for Python 3.12 manylinux x86-64 and does not build as pure Python" >&2
            exit 1
        fi
        echo "built $req (pure Python)"
    fi
done
echo "wheels in $DIR ($(du -sh "$DIR" | cut -f1)); carry it to the GPU machine with the working tree"
