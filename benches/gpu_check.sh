#!/usr/bin/env bash
# Checks and measures moerail's CUDA path on this GPU machine in one run (see benches/gpu_check.py):
#   benches/gpu_check.sh OUTDIR [--bundle gpu-bundle] [--budget 550]
# Needs only the bundle `make gpu-bundle` made (no network) and a Python with torch and pytest
# ($PYTHON, default python3). Writes summary.md, results.json, doctor.json, bench.md, bench.json,
# log.txt and manifest.json into OUTDIR and prints one "GPU-CHECK SUMMARY:" line.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
