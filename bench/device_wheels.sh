#!/usr/bin/env bash
# The wheels the GPU machine lacks, fetched here for it: the packages setup.cfg needs that
# bench/offline/gpu_machine_packages.txt does not list, with their dependency closure less what
# that list holds, as manylinux x86-64 binary wheels for CPython PYTHON_VERSION (3.12 there).
#
#   bench/device_wheels.sh OUT_DIR [PYTHON_VERSION]
#
# PIP is the pip to run: by default the project's .venv's (make setup), else python3's.
#
# Where the environment of that pip has a package installed, its version is taken (the version
# the tests ran with), else the newest that fits. OUT_DIR ends up holding exactly that set
# (older or foreign wheels in it are removed); the last line gives their total size.
# `bench/gpu_check.sh --wheels OUT_DIR` installs them offline (docs/gpu_check.md). Extras are
# not followed: fsspec[s3] would bring s3fs and botocore (13 MB) for remote stores, which the
# check does not read. The manylinux tags stop at glibc 2.35, so the same command
# also fetches a set that loads on this Debian 12 machine (glibc 2.36) for the rehearsal.
set -euo pipefail
if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: bench/device_wheels.sh OUT_DIR [PYTHON_VERSION]" >&2
    exit 2
fi
out=$1
version=${2:-3.12}
root=$(cd "$(dirname "$0")/.." && pwd)
default_pip="python3 -m pip"
[[ -x $root/.venv/bin/python ]] && default_pip="$root/.venv/bin/python -m pip"
read -r -a pip <<< "${PIP:-$default_pip}"
platforms=()
for minor in $(seq 35 -1 17); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64
            --platform manylinux1_x86_64)
target=(--only-binary=:all: --implementation cp --python-version "$version" "${platforms[@]}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# What setup.cfg requires that the GPU machine has not (names compared as PEP 503 says).
mapfile -t wanted < <(python3 "$root/bench/offline/gpu_machine_packages.py" missing)
echo "the GPU machine lacks: ${wanted[*]}"
# The versions installed beside that pip (the ones the tests ran with here) where it has them.
"${pip[@]}" freeze | grep -E '^[A-Za-z0-9._-]+==' > "$work/constraints.txt" || true
# Resolve the closure for that Python and platform without installing anything.
"${pip[@]}" install --quiet --dry-run --ignore-installed --target "$work/target" \
    --constraint "$work/constraints.txt" --report "$work/report.json" "${target[@]}" \
    "${wanted[@]}"
mapfile -t pins < <(python3 "$root/bench/offline/gpu_machine_packages.py" missing-pins "$work/report.json")
mkdir -p "$out"
"${pip[@]}" download --quiet --no-deps --dest "$work/wheels" "${target[@]}" "${pins[@]}"
rm -f "$out"/*.whl
mv "$work"/wheels/*.whl "$out"/
ls -l "$out"/*.whl | awk '{printf "  %6.1f MiB  %s\n", $5 / 2^20, $9}'
du -cb "$out"/*.whl | awk 'END {printf "%d wheels, %.1f MiB (%d bytes) in %s\n", NR - 1, $1 / 2^20, $1, "'"$out"'"}'
