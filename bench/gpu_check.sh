#!/usr/bin/env bash
# The GPU check (make gpu-check; docs/gpu_check.md): bench/gpu_check.py's sections, each in its
# own process under its own timeout, a line as each ends, DIR/summary.json at the end.
#
#   PY=python3 bench/gpu_check.sh [--wheels DIR] [--rehearse] [--out DIR] [--reduced]
#                                 [--only S1,S2] [--budget SECONDS]
#
# --wheels DIR  installs DIR/*.whl (bench/device_wheels.sh) into a temporary folder put on
#               PYTHONPATH: no venv, no network (the bare GPU machine's python3).
# --rehearse    hides from PY every installed distribution that the GPU machine does not have
#               (bench/offline/sitecustomize.py), so the run imports only what it would there;
#               without --wheels, PY's own copies of what the wheels would bring are copied into
#               the temporary folder instead (the same versions: device_wheels.sh pins to them).
# Without CUDA (or with --reduced) every section runs at toy sizes on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
args=()
wheels=
rehearse=
while [[ $# -gt 0 ]]; do
    case $1 in
        --wheels) wheels=${2:?--wheels needs a folder}; shift 2 ;;
        --rehearse) rehearse=1; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
path=$PWD
if [[ -n $wheels || -n $rehearse ]]; then
    site=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")
    trap 'rm -rf "$site"' EXIT
    path=$path:$site
fi
if [[ -n $wheels ]]; then
    shopt -s nullglob
    found=("$wheels"/*.whl)
    if [[ ${#found[@]} -eq 0 ]]; then
        echo "error: $wheels: no wheels (bench/device_wheels.sh $wheels fetches them)" >&2
        exit 2
    fi
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
        --target "$site" "${found[@]}"
    echo "wheels: ${#found[@]} from $wheels installed into $site"
elif [[ -n $rehearse ]]; then
    echo "wheels: none given; copied $("$PY" bench/offline/gpu_machine_packages.py \
        copy-installed "$site") into $site"
fi
if [[ -n $rehearse ]]; then
    path=$PWD/bench/offline:$path
fi
export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$PY" bench/gpu_check.py "${args[@]}"
