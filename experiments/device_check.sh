#!/usr/bin/env bash
# One-shot accelerator check of lkv_jax on a bare machine with one NVIDIA GPU (or a TPU VM), in under
# 9 minutes of wall time, every stage time-boxed with `timeout` and cut short to the overall deadline:
#
#   install       a venv with the project and jax[cuda12] / jax[tpu] (== the pinned jax 0.10.2)
#   env           what jax sees (platform, devices), nvidia-smi on a GPU
#   kernel_tests  the Pallas kernel tests COMPILED on the device (LKV_PALLAS_COMPILED=1), not interpreted
#   kernel_bench  experiments/bench_kernel.py: Pallas vs XLA suffix attention and select at 8K and 32K
#   e2e_32k       bench_kernel.py --e2e: LookaheadKV eviction overhead as % of prefill, Llama-3.1-8B-shaped
#   e2e_8k        (4 layers, bfloat16) at 32K and 8K tokens
#   lookahead_8k  experiments/bench_lookahead.py at 8K: LookaheadKV vs SnapKV, SpecKV and LAQ (timed)
#
# A failed or timed-out stage is recorded and the next one runs. Every figure is JSON under $OUT
# (default ./device-out): bench_*.json from the scripts, kernel_tests.json, env.json, and summary.json
# (each stage: status, exit code, seconds, log file, result file). Logs: $OUT/logs/<stage>.log.
#
#   experiments/device_check.sh                      # auto-detects GPU / TPU; creates $OUT/venv
#   experiments/device_check.sh --platform tpu       # force the TPU install (jax[tpu])
#   experiments/device_check.sh --venv .venv --skip-install   # use an environment that is already there
#   experiments/device_check.sh --smoke              # CPU, tiny sizes, every stage end to end (~minutes)
#   experiments/device_check.sh --dry-run            # print the stages' commands, run nothing
#
# Options: --platform auto|gpu|tpu|cpu, --venv DIR, --skip-install, --no-torch (no torch/transformers:
# bench_lookahead.py builds its model through transformers and the kernel integration tests need them too;
# torch is the CPU wheel, the default one pulls a multi-GB CUDA build), --budget SECONDS (overall deadline,
# default 530; 1800 with --smoke), --smoke, --dry-run.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-./device-out}"
PLATFORM=auto
VENV=""
SKIP_INSTALL=0
WITH_TORCH=1
SMOKE=0
DRY=0
BUDGET=""
JAX_VERSION="$(sed -n 's/^ *"jax==\([0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml" | head -1)"

while [ $# -gt 0 ]; do
  case "$1" in
    --platform) PLATFORM="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --no-torch) WITH_TORCH=0; shift ;;
    --smoke) SMOKE=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --budget) BUDGET="$2"; shift 2 ;;
    -h|--help) sed -n '2,27p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$PLATFORM" = auto ]; then
  if [ "$SMOKE" = 1 ]; then PLATFORM=cpu
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then PLATFORM=gpu
  elif ls /dev/accel* >/dev/null 2>&1 || ls /dev/vfio/[0-9]* >/dev/null 2>&1 || [ -n "${TPU_NAME:-}" ]; then PLATFORM=tpu
  else PLATFORM=cpu
  fi
fi
case "$PLATFORM" in
  gpu) JAX_SPEC="jax[cuda12]==$JAX_VERSION" ;;
  tpu) JAX_SPEC="jax[tpu]==$JAX_VERSION" ;;
  cpu) JAX_SPEC="jax==$JAX_VERSION" ;;
  *) echo "--platform must be auto, gpu, tpu or cpu, got $PLATFORM" >&2; exit 2 ;;
esac
# the smoke run on a (possibly shared) CPU interprets the kernels: 4x the time boxes, 30 minutes overall
CAP_SCALE=$([ "$SMOKE" = 1 ] && echo 4 || echo 1)
BUDGET="${BUDGET:-$([ "$SMOKE" = 1 ] && echo 1800 || echo 530)}"
if [ "$SMOKE" = 1 ] && [ -z "$VENV" ] && [ -x "$ROOT/.venv/bin/python" ]; then
  VENV="$ROOT/.venv"; SKIP_INSTALL=1  # the smoke run checks the script's logic, not a fresh install
fi
[ "$DRY" = 1 ] || mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" 2>/dev/null && pwd || echo "$OUT")"
VENV="${VENV:-$OUT/venv}"
PY="$VENV/bin/python"
cd "$ROOT" || exit 2

START=$(date +%s)
SUMMARY_ROWS=""

# run_stage NAME CAP_SECONDS RESULT_FILE COMMAND...: time-boxed to min(CAP, what is left of the budget)
run_stage() {
  local name="$1" cap="$2" result="$3"; shift 3
  local now left limit t0 rc status secs
  cap=$((cap * CAP_SCALE))
  now=$(date +%s); left=$((BUDGET - (now - START)))
  limit=$(( cap < left ? cap : left ))
  if [ "$DRY" = 1 ]; then
    echo "[$name] (<= ${cap}s) $*"; return 0
  fi
  if [ "$limit" -lt 10 ]; then
    echo "[$name] skipped: ${left}s left of the ${BUDGET}s budget"
    SUMMARY_ROWS+="$(printf '{"stage": "%s", "status": "skipped", "reason": "budget", "seconds": 0}' "$name"),"
    return 0
  fi
  echo "[$name] up to ${limit}s: $*"
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if [ $rc -eq 0 ]; then status=passed; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout; else status=failed; fi
  [ -n "$result" ] && [ ! -s "$result" ] && [ "$status" = passed ] && status=failed  # no figures written
  echo "[$name] $status (rc $rc, ${secs}s)"
  [ "$status" = passed ] || tail -n 5 "$OUT/logs/$name.log" | sed "s/^/[$name]   /"
  SUMMARY_ROWS+="$(printf '{"stage": "%s", "status": "%s", "rc": %d, "seconds": %s, "limit_s": %d, "log": "%s", "result": %s}' \
    "$name" "$status" "$rc" "$secs" "$limit" "logs/$name.log" "$( [ -n "$result" ] && printf '"%s"' "${result#"$OUT"/}" || echo null)"),"
}

install() {
  set -e
  [ -x "$PY" ] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  # jax (with its CUDA / TPU plugin) first, pinned to the project's version, then the project itself
  "$PY" -m pip install -q "$JAX_SPEC" "jaxlib==$JAX_VERSION"
  "$PY" -m pip install -q -e "$ROOT" "pytest>=8"
  if [ "$WITH_TORCH" = 1 ]; then  # the CPU wheel (PyTorch's CPU index); a PyPI torch is a multi-GB CUDA build
    "$PY" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
      || "$PY" -m pip install -q "torch==2.13.0"
    "$PY" -m pip install -q "transformers>=5.3"
  fi
  "$PY" -c "import jax, lkv_jax; print(jax.__version__, jax.default_backend(), jax.devices())"
}

env_info() {
  "$PY" - "$OUT/env.json" "$PLATFORM" <<'EOF'
import json, subprocess, sys
import jax
info = {"requested_platform": sys.argv[2], "jax": jax.__version__, "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()], "device_kind": jax.devices()[0].device_kind}
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                         "--format=csv,noheader"], capture_output=True, text=True,
                                        timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    pass
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
ok = sys.argv[2] == "cpu" or info["backend"] == sys.argv[2]
sys.exit(0 if ok else f"jax runs on {info['backend']}, not the requested {sys.argv[2]}: check the install log")
EOF
}

kernel_tests() {
  local files=(tests/test_kernel_suffix_attention.py tests/test_kernel_select.py)
  if "$PY" -c "import torch, transformers" >/dev/null 2>&1; then files+=(tests/test_kernel_integration.py); fi
  local rc=0
  # the smoke run takes the quick cases only: it checks this stage's plumbing, the full run checks the kernels
  local pick=()
  [ "${SMOKE:-0}" = 1 ] && pick=(-k "bad_inputs or by_hand or lowers or order_keys")
  "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/kernel_tests.xml" "${pick[@]}" "${files[@]}" || rc=$?
  # the counts as JSON beside the JUnit XML
  "$PY" - "$OUT/kernel_tests.xml" "$OUT/kernel_tests.json" "${LKV_PALLAS_COMPILED:-0}" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
cases = []
for c in suite.iter("testcase"):
    state = "passed"
    for tag in ("failure", "error", "skipped"):
        if c.find(tag) is not None:
            state = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
    cases.append({"test": f"{c.get('classname')}::{c.get('name')}", "state": state, "seconds": float(c.get("time", 0))})
counts = {s: sum(c["state"] == s for c in cases) for s in ("passed", "failed", "error", "skipped")}
json.dump({"compiled": sys.argv[3] not in ("", "0"), "counts": counts, "cases": cases}, open(sys.argv[2], "w"), indent=1)
print(counts)
EOF
  return $rc
}

if [ "$SMOKE" = 1 ]; then  # tiny sizes: the same stages, minutes on a CPU (Pallas interpreted)
  KERNEL_ARGS=(--quick --sizes 1024 --repeats 1)
  E2E_32K=(--quick --e2e --skip-kernels --e2e-tokens 1024 --repeats 1)
  E2E_8K=(--quick --e2e --skip-kernels --e2e-tokens 512 --repeats 1)
  LOOKAHEAD=(--lengths 512 --repeats 1)
  COMPILED=0
else
  KERNEL_ARGS=(--sizes 8192 32768)
  E2E_32K=(--e2e --skip-kernels --e2e-tokens 32768)
  E2E_8K=(--e2e --skip-kernels --e2e-tokens 8192)
  LOOKAHEAD=(--lengths 8192)
  COMPILED=$([ "$PLATFORM" = cpu ] && echo 0 || echo 1)
fi

# the stages that are shell functions run as `bash -c NAME` under timeout, which needs them exported
export -f install env_info kernel_tests
export PY VENV JAX_SPEC JAX_VERSION ROOT WITH_TORCH OUT PLATFORM SMOKE

echo "device check: platform $PLATFORM ($JAX_SPEC), venv $VENV, out $OUT, budget ${BUDGET}s$([ "$SMOKE" = 1 ] && echo ', smoke sizes')"
if [ "$SKIP_INSTALL" = 1 ]; then
  echo "[install] skipped (--skip-install): $PY"
  SUMMARY_ROWS+='{"stage": "install", "status": "skipped", "reason": "--skip-install", "seconds": 0},'
else
  run_stage install 270 "" bash -c install
fi
run_stage env 60 "$OUT/env.json" bash -c env_info
run_stage kernel_tests 100 "$OUT/kernel_tests.json" env LKV_PALLAS_COMPILED=$COMPILED bash -c kernel_tests
run_stage kernel_bench 70 "$OUT/bench_kernel.json" "$PY" experiments/bench_kernel.py "${KERNEL_ARGS[@]}" --out "$OUT/bench_kernel.json"
run_stage e2e_32k 80 "$OUT/bench_kernel_e2e_32k.json" "$PY" experiments/bench_kernel.py "${E2E_32K[@]}" --out "$OUT/bench_kernel_e2e_32k.json"
run_stage e2e_8k 50 "$OUT/bench_kernel_e2e_8k.json" "$PY" experiments/bench_kernel.py "${E2E_8K[@]}" --out "$OUT/bench_kernel_e2e_8k.json"
run_stage lookahead_8k 150 "$OUT/bench_lookahead_8k.json" "$PY" experiments/bench_lookahead.py "${LOOKAHEAD[@]}" --out "$OUT/bench_lookahead_8k.json"

[ "$DRY" = 1 ] && exit 0
TOTAL=$(( $(date +%s) - START ))
FAILED=$(printf '%s' "$SUMMARY_ROWS" | grep -o '"status": "\(failed\|timeout\)"' | wc -l)
printf '{"platform": "%s", "jax": "%s", "smoke": %s, "budget_s": %d, "total_s": %d, "failed_stages": %d, "stages": [%s]}\n' \
  "$PLATFORM" "$JAX_SPEC" "$([ "$SMOKE" = 1 ] && echo true || echo false)" "$BUDGET" "$TOTAL" "$FAILED" \
  "${SUMMARY_ROWS%,}" >"$OUT/summary.json"
echo "done in ${TOTAL}s, $FAILED stage(s) failed or timed out: $OUT/summary.json"
[ "$FAILED" -eq 0 ]
