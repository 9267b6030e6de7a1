#!/usr/bin/env bash
# The one command for a GPU machine lent for a few minutes (offline, no duckdb/zstandard installed):
#
#     bash bench/device_check.sh OUT_DIR [bench/device_check.py options, e.g. --only neurons,sae --budget 300]
#
# Run from anywhere; it works in the repository root. Stages:
#   1. install the wheels in .whl/ (duckdb, zstandard; carried beside the working tree) and this package, both
#      into $SITE_DIR (default /tmp/site), without network or dependencies; PYTHONPATH points there
#   2. print the GPU (nvidia-smi), torch, transformers, the C compiler
#   3. the parity tests: pytest of tests/test_gpu_parity.py (the Triton kernels' backend among them) and the CUDA
#      cases of tests/test_backends.py (TESTS=0 skips them), JUnit XML into OUT_DIR/parity.xml
#   4. python3 bench/device_check.py --out OUT_DIR ...: the benchmarks (see its docstring; its `backends` stage
#      compares the Triton kernels with the tensor step in CUDA graphs at batch 64 and 256 and prints the ratios)
# Everything is teed to OUT_DIR/device_check.log; device_check.py writes OUT_DIR/device_check.json. A failing stage
# does not stop the next; the exit status is 0 only when every stage passed.
# Overrides (for a dry run elsewhere): PYTHON (default python3), WHL_DIR (default .whl), SITE_DIR (default /tmp/site),
# TESTS (default 1).
set -u
OUT="${1:-/tmp/device_check_out}"
[ $# -gt 0 ] && shift
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PY="${PYTHON:-python3}"
WHL="${WHL_DIR:-.whl}"
SITE="${SITE_DIR:-/tmp/site}"
LOG="$OUT/device_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
status=0
T0=$(date +%s)
stage() { echo; echo "=================================================================================================="; echo "== [sh] $*  ($(( $(date +%s) - T0 ))s in)"; echo "=================================================================================================="; }

stage "install wheels from $WHL and this package into $SITE"
rm -rf "$SITE" && mkdir -p "$SITE"
if ls "$WHL"/*.whl >/dev/null 2>&1; then
  ls -la "$WHL"/*.whl
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHL"/*.whl; then
    echo "!! pip could not install the wheels; unpacking them into $SITE instead (they have no .data parts)"
    for w in "$WHL"/*.whl; do "$PY" -m zipfile -e "$w" "$SITE" || status=1; done
  fi
else
  echo "!! no wheels in $WHL (run with the run tool's carry=[\".whl\"])"; status=1
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
     --target "$SITE" . ; then
  echo "!! pip install of the package failed; linking the source folders into $SITE/featureatlas instead"
  rm -rf "$SITE/featureatlas" && mkdir -p "$SITE/featureatlas"
  for f in featureatlas/*; do ln -s "$PWD/$f" "$SITE/featureatlas/"; done
  for part in load harvest store build export annotate serve explain site_templates; do
    ln -s "$PWD/$part" "$SITE/featureatlas/$part"
  done
fi
"$PY" - <<'EOF' || status=1
import importlib
for name in ("duckdb", "zstandard", "featureatlas.cli", "featureatlas.harvest.run", "featureatlas.store.writer",
             "featureatlas.build.site"):
    try:
        module = importlib.import_module(name)
        print(f"  import {name:<28} ok  {getattr(module, '__version__', '')} {getattr(module, '__file__', '')}")
    except Exception as err:
        print(f"  import {name:<28} FAILED: {type(err).__name__}: {err}")
        raise SystemExit(1)
EOF

stage "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu --format=csv,noheader \
  || echo "(no nvidia-smi)"
"$PY" -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| transformers', transformers.__version__)" \
  || status=1
"$PY" -c "import torch, triton; from featureatlas.harvest import kernels; print('triton', triton.__version__, \
'| kernels run on cuda:', kernels.available(torch.device('cuda')))" || echo "(no triton: the TRITON backend is off)"
echo "cores $(nproc), cc: $(command -v cc || command -v gcc || echo none), $(df -h /tmp | tail -1 | awk '{print $4}') free in /tmp"

if [ "${TESTS:-1}" != 0 ]; then
  stage "parity tests: tests/test_gpu_parity.py, the CUDA cases of tests/test_backends.py"
  "$PY" -m pytest -q -p no:cacheprovider --junitxml "$OUT/parity.xml" tests/test_gpu_parity.py \
    tests/test_backends.py -k "cuda or parity" || status=1
fi

stage "bench/device_check.py $*"
PYTHONUNBUFFERED=1 "$PY" bench/device_check.py --out "$OUT" "$@"
rc=$?
[ $rc -ne 0 ] && status=1
stage "done: device_check.py exit $rc, overall status $status; log $LOG, summary $OUT/device_check.json"
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit $status
