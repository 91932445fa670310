#!/usr/bin/env bash
# The whole benchmark, one command: bash benchmarks/run.sh
# - tiltlm's environment is the repository's .venv (setup.sh makes it);
# - TRL gets its own environment, benchmarks/.venv-trl, created here when missing (TRL is never a tiltlm
#   dependency): the CPU build of torch first, then TRL and the same transformers as tiltlm's;
# - then the equivalence tests, every configuration in its own process, and benchmarks/RESULTS.md.
# BENCH_SKIP_TESTS=1 skips the tests; extra arguments go to run.py (e.g. --models tiny20m).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
TRL_VENV=benchmarks/.venv-trl
if [ ! -x "$TRL_VENV/bin/python" ] || ! "$TRL_VENV/bin/python" -c "import trl" 2>/dev/null; then
    TRANSFORMERS_VERSION=$("$PY" -c "import transformers; print(transformers.__version__)")
    python3 -m venv "$TRL_VENV"
    "$TRL_VENV/bin/python" -m pip install -q "torch==2.13.0"
    "$TRL_VENV/bin/python" -m pip install -q "trl==1.16.0" "transformers==$TRANSFORMERS_VERSION"
fi
mkdir -p benchmarks/out
if [ "${BENCH_SKIP_TESTS:-0}" != 1 ]; then
    "$PY" -m pytest -q -p no:cacheprovider tests/test_fastpaths.py tests/test_refcache.py \
        > benchmarks/out/tests.txt 2>&1 || { tail -30 benchmarks/out/tests.txt; exit 1; }
    tail -1 benchmarks/out/tests.txt
fi
exec "$PY" benchmarks/run.py "$@"
