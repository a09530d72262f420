#!/usr/bin/env bash
# Fetch, here, the wheels the GPU machine's Python 3.12 lacks, into .whl/
# (ignored by git), at the versions this checkout's virtual environment uses.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
py=".venv/bin/python"
mkdir -p .whl
# What the device image has not (its package list: the device tool's KINDS.md).
for name in dask distributed tornado tblib zict partd locket zarr numcodecs donfig google-crc32c crc32c \
            pytest-timeout sortedcontainers toolz cloudpickle msgpack; do
    version=$("$py" -m pip show "$name" 2>/dev/null | awk '/^Version:/{print $2}')
    [ -n "$version" ] || { echo "skip $name (not installed here)"; continue; }
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "$name==$version" || echo "could not fetch $name==$version"
done
# aimss_dask itself travels with the working tree.
du -sh .whl
