#!/usr/bin/env bash
# One check of a GPU or TPU machine, within a time budget and with no network: the tests marked
# `accelerator`, the kernel benchmarks (gmm; block-sparse against flash attention), the ragged
# against the padded expert exchange, and 50 training steps of the default config (and again with
# the XLA grouped matmul when time allows). Prints one summary table at the end (part, status,
# seconds, key numbers); each part's full output goes to $OUT/<part>.log ($OUT, or a new
# temporary directory), the table to $OUT/summary.txt. Exits 1 if any part failed, 2 on bad
# arguments. Nothing is installed: jax must already see the accelerator.
#
#   bash scripts/accelerator_check.sh [--quick] [--cpu] [--budget SECONDS]
#                                     [--part-timeout SECONDS] [--parts LIST]
#
#   --quick                 small benchmark shapes, 10 training steps (a smoke test)
#   --cpu                   run on the CPU instead of failing when jax sees no accelerator
#   --budget SECONDS        time for all parts together (default 540)
#   --part-timeout SECONDS  one timeout for every part after the platform probe (default: each
#                           part's own, all within the budget)
#   --parts LIST            comma-separated subset of tests,gmm,attention,exchange,train,train_xla
#
# Or from the environment: MOEJAX_CHECK_QUICK=1, MOEJAX_CHECK_CPU=1, MOEJAX_CHECK_BUDGET,
# MOEJAX_CHECK_PART_TIMEOUT, MOEJAX_CHECK_PARTS. MOEJAX_CHECK_PYTHON is the interpreter (default
# .venv/bin/python, which needs jax's CUDA plugin, the `cuda12` extra, or libtpu).
set -uo pipefail
# A relative $OUT is taken from where the script was started, before it moves to the checkout.
case ${OUT:-} in '' | /*) ;; *) OUT=$PWD/$OUT ;; esac
cd "$(dirname "$0")/.." || exit 2

ALL_PARTS="tests gmm attention exchange train train_xla"
quick=${MOEJAX_CHECK_QUICK:-0}
on_cpu=${MOEJAX_CHECK_CPU:-0}
budget=${MOEJAX_CHECK_BUDGET:-540}
parts=${MOEJAX_CHECK_PARTS:-all}
part_timeout=${MOEJAX_CHECK_PART_TIMEOUT:-}
py=${MOEJAX_CHECK_PYTHON:-.venv/bin/python}

usage() { sed -n '2,/^set /s/^# \{0,1\}//p' "$0"; }
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1 ;;
    --cpu) on_cpu=1 ;;
    --budget) budget=${2:?--budget needs a number of seconds}; shift ;;
    --parts) parts=${2:?--parts needs a list}; shift ;;
    --part-timeout) part_timeout=${2:?--part-timeout needs a number of seconds}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "accelerator_check: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
[ "$parts" = all ] && parts=$ALL_PARTS
parts=${parts//,/ }
for part in $parts; do
  case " $ALL_PARTS " in
    *" $part "*) ;;
    *) echo "accelerator_check: --parts: unknown part $part; allowed: $ALL_PARTS" >&2; exit 2 ;;
  esac
done
for value in "budget=$budget" "part-timeout=$part_timeout"; do
  case ${value#*=} in
    *[!0-9]*)
      echo "accelerator_check: --${value%%=*}: ${value#*=} is not a whole number of seconds" >&2
      exit 2 ;;
  esac
done
[ -n "$budget" ] || budget=540
if [ ! -x "$py" ]; then
  echo "accelerator_check: no Python at $py: create .venv first (scripts/setup.sh, plus the" \
    "cuda12 or tpu extra) or set MOEJAX_CHECK_PYTHON" >&2
  exit 2
fi

# The benchmarks import moejax and kernels_pallas from the checkout also with a Python that has
# no editable install of it.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out_dir=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/moejax-accelerator-check.XXXXXX")}
mkdir -p "$out_dir"
scratch=$(mktemp -d "${TMPDIR:-/tmp}/moejax-accelerator-work.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

if [ "$quick" = 1 ]; then
  repeats=2
  train_flags=(--config.train.steps=10 --config.train.warmup_steps=2 --config.train.log_every=5
    --config.data.eval_batches=2)
  quick_flag=(--quick)
else
  repeats=5
  train_flags=(--config.train.steps=50)
  quick_flag=()
fi
reserve=5  # seconds kept for the table
min_part=20  # a part with less time than this left is skipped

start=$SECONDS
names=() statuses=() times=() notes=()
current="" child=""

record() {  # name status seconds note
  names+=("$1") statuses+=("$2") times+=("$3") notes+=("$4")
  echo "-- $1: $2 (${3}s)"
}

print_table() {
  local i
  {
    echo
    echo "accelerator check: ${platform_line:-platform unknown}"
    echo "quick=$quick cpu=$on_cpu budget=${budget}s total=$((SECONDS - start))s logs=$out_dir"
    printf '%-10s | %-7s | %6s | %s\n' part status time "key numbers"
    printf '%-10s-|-%-7s-|-%6s-|-%s\n' ---------- ------- ------ -----------
    for i in "${!names[@]}"; do
      printf '%-10s | %-7s | %5ss | %s\n' "${names[i]}" "${statuses[i]}" "${times[i]}" "${notes[i]}"
    done
  } | tee "$out_dir/summary.txt"
}

any_failed() { [[ " ${statuses[*]} " == *" fail "* ]]; }

on_signal() {
  trap - INT TERM
  if [ -n "$child" ]; then
    kill -TERM "$child" 2>/dev/null
    wait "$child" 2>/dev/null
  fi
  [ -n "$current" ] && record "$current" fail "$((SECONDS - part_start))" "interrupted"
  local part
  for part in $parts; do
    [[ " ${names[*]} " == *" $part "* ]] || record "$part" skipped 0 "interrupted before it ran"
  done
  print_table
  exit 130
}
trap on_signal INT TERM

# run NAME CAP COMMAND...: runs COMMAND under `timeout` (CAP seconds, less if the budget has
# less left) with its output in $out_dir/NAME.log; sets rc, elapsed, limit and log. Returns 1
# without running when the budget is spent (the part is recorded as skipped).
run() {
  local name=$1 cap=$2 left
  shift 2
  left=$((budget - (SECONDS - start) - reserve))
  if [ "$left" -lt "$min_part" ]; then
    record "$name" skipped 0 "budget spent (${left}s left)"
    return 1
  fi
  [ -n "$part_timeout" ] && [ "$name" != platform ] && cap=$part_timeout
  [ "$cap" -gt "$left" ] && cap=$left
  log=$out_dir/$name.log limit=$cap
  echo "== $name (timeout ${cap}s): $*" >"$log"
  current=$name part_start=$SECONDS
  # In the background, so that a signal reaches on_signal without waiting for the part.
  timeout --kill-after=10 "$cap" "$@" >>"$log" 2>&1 &
  child=$!
  wait "$child"
  rc=$?
  child="" current=""
  elapsed=$((SECONDS - part_start))
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    rc=124
    echo "== $name: killed after ${cap}s" >>"$log"
  fi
  return 0
}

summary_of() { grep '^summary: ' "$log" | tail -1 | sed 's/^summary: //'; }
last_error() { grep -v '^\s*$' "$log" | tail -1 | cut -c1-160; }

# record the part just run: pass on status 0, with KEY; fail otherwise, with the reason.
finish() {  # name key
  if [ "$rc" = 124 ]; then
    record "$1" fail "$elapsed" "timed out after ${limit}s; output so far in ${log##*/}"
  elif [ "$rc" != 0 ]; then
    record "$1" fail "$elapsed" "exit $rc: $(last_error)"
  else
    record "$1" pass "$elapsed" "$2"
  fi
}

wanted() { case " $parts " in *" $1 "*) return 0 ;; esac; return 1; }

# The platform: jax must see a GPU or TPU (or run on the CPU when asked), and says what is
# missing when it does not.
read -r -d '' probe <<'PY'
import glob
import importlib.metadata
import shutil
import sys

import jax
import jax.extend

allow_cpu = sys.argv[1] == "1"
backend, devices = jax.default_backend(), jax.devices()
default = jax.extend.backend.get_backend()
# The registered name ("cuda", "tpu"): JAX_PLATFORMS=gpu would also ask for ROCm and fail.
names = [name for name, client in jax.extend.backend.backends().items() if client is default]
print(f"backend={backend}")
print(f"jax_platforms={names[0] if names else backend}")
print(f"platform: jax {jax.__version__}, {backend}: {len(devices)} x {devices[0].device_kind}")
if backend != "cpu" or allow_cpu:
    sys.exit(0)


def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


jaxlib = version("jaxlib")
cuda = {n: version(n) for n in ("jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin")}
cuda = {n: v for n, v in cuda.items() if v}
has_gpu = bool(shutil.which("nvidia-smi") or glob.glob("/dev/nvidia[0-9]*"))
has_tpu = bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))
print("missing: jax sees no GPU or TPU, only the CPU.")
if has_gpu and not cuda:
    print(
        f"missing: an NVIDIA GPU is present, but {sys.executable} has no jax CUDA plugin "
        f"(jax-cuda12-plugin and jax-cuda12-pjrt matching jaxlib {jaxlib}). On a machine with "
        "network: .venv/bin/pip install -e '.[cuda12]' (scripts/setup.sh installs the CPU and TPU "
        "builds only), then bring that .venv here, or set MOEJAX_CHECK_PYTHON to a Python that "
        "has it. This script installs nothing."
    )
elif has_gpu:
    try:
        jax.devices("gpu")
    except RuntimeError as error:
        print(f"missing: the CUDA plugin {cuda} (jaxlib {jaxlib}) is installed but did not start:")
        print(f"missing: {error}")
elif has_tpu and not version("libtpu"):
    print(
        f"missing: TPU devices are present, but {sys.executable} has no libtpu. On a machine "
        "with network: .venv/bin/pip install -e '.[tpu]', or run scripts/setup.sh."
    )
elif has_tpu:
    try:
        jax.devices("tpu")
    except RuntimeError as error:
        print(f"missing: libtpu {version('libtpu')} is installed but did not start: {error}")
else:
    print(
        "missing: this machine shows no NVIDIA GPU (no nvidia-smi, no /dev/nvidia*) and no TPU "
        "(no /dev/accel*, no /dev/vfio)."
    )
print("missing: --cpu runs the check on the CPU instead (to test this script).")
sys.exit(3)
PY

platform_line=""
if [ "$on_cpu" = 1 ]; then
  export JAX_PLATFORMS=cpu
fi
run platform 120 "$py" -c "$probe" "$on_cpu"
platform_line=$(grep '^platform: ' "$log" | tail -1 | sed 's/^platform: //')
backend=$(grep '^backend=' "$log" | tail -1 | cut -d= -f2)
if [ "$rc" != 0 ] || [ -z "$backend" ]; then
  if grep -q '^missing: ' "$log"; then
    grep '^missing: ' "$log" | sed 's/^missing: //'
    reason=$(grep '^missing: ' "$log" | sed -n '2s/^missing: //p' | cut -c1-120)
    record platform fail "$elapsed" "no accelerator: $reason"
  else
    finish platform ""
  fi
  for part in $parts; do record "$part" skipped 0 "no platform"; done
  print_table
  exit 1
fi
record platform pass "$elapsed" "$platform_line"
# Every part runs on the platform found (tests/conftest.py would pick the CPU otherwise).
JAX_PLATFORMS=$(grep '^jax_platforms=' "$log" | tail -1 | cut -d= -f2)
export JAX_PLATFORMS
command -v nvidia-smi >/dev/null 2>&1 \
  && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$log" 2>&1

# (a) the tests marked `accelerator` (tests/conftest.py skips them on the CPU).
if wanted tests; then
  mapfile -t test_files < <(grep -rl --include='*.py' 'mark\.accelerator' tests | sort)
  if run tests 150 "$py" -m pytest -m accelerator -q -p no:cacheprovider \
      "${test_files[@]:-tests}"; then
    counts=$(grep -E '[0-9]+ (passed|failed|skipped|error)' "$log" | tail -1 | tr -d '=')
    counts=${counts# }
    if [ "$rc" = 0 ] && ! grep -q ' passed' <<<"$counts"; then
      record tests skipped "$elapsed" "${counts:-no tests ran}"
    else
      finish tests "$counts"
    fi
  fi
fi

# (b) the kernel benchmarks: gmm against a dense matmul and ragged_dot; block-sparse attention
# against flash attention over density.
for part in gmm attention; do
  if wanted $part && run $part 180 "$py" benchmarks/kernels.py --part $part \
      --repeats "$repeats" "${quick_flag[@]}"; then
    finish $part "$(summary_of)"
  fi
done

# (c) the ragged against the padded expert exchange; needs >= 2 devices (8 fake ones on the CPU,
# which has no ragged all-to-all).
if wanted exchange; then
  if [ "$on_cpu" = 1 ]; then
    exchange=(env "XLA_FLAGS=${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
      "$py" benchmarks/expert_exchange.py --exchange padded)
  else
    exchange=("$py" benchmarks/expert_exchange.py --exchange both)
  fi
  if run exchange 150 "${exchange[@]}" --repeats "$repeats" "${quick_flag[@]}"; then
    key=$(summary_of)
    if [ "$rc" = 0 ] && [[ $key == skipped:* ]]; then
      record exchange skipped "$elapsed" "${key#skipped: }"
    else
      finish exchange "$key"
    fi
  fi
fi

# (d) training steps of the default config; the same with the XLA grouped matmul if time allows.
# Throughput is the last logging interval's, which excludes compilation.
read -r -d '' throughput <<'PY'
import json
import sys

from moejax import config

workdir, wall = sys.argv[1], float(sys.argv[2])
data = config.load_config_file("configs/default.py").data
records = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
train = [r for r in records if r["split"] == "train"]
evals = [r for r in records if r["split"] == "eval"]
tokens = train[-1]["tokens_per_second"]
first = train[-2]["step"] + 1 if len(train) > 1 else 1
print(
    f"{tokens:,.0f} tok/s, {tokens / (data.seq_len * data.global_batch_size):.2f} steps/s "
    f"(steps {first}-{train[-1]['step']}); {evals[-1]['bits_per_byte']:.3f} bits/byte; "
    f"{wall:.0f} s in all"
)
print(f"tokens_per_second={tokens}")
PY

train_seconds=""
train_tokens=""
for part in train train_xla; do
  wanted $part || continue
  flags=("${train_flags[@]}")
  if [ $part = train_xla ]; then
    flags+=(--config.model.moe.dispatch.options.gmm_impl=xla)
    left=$((budget - (SECONDS - start) - reserve))
    if [ -n "$train_seconds" ] && [ "$left" -lt $((train_seconds + 10)) ]; then
      record train_xla skipped 0 "not enough budget left (${left}s; train took ${train_seconds}s)"
      continue
    fi
  fi
  workdir=$scratch/$part
  run $part 240 "$py" train.py --workdir "$workdir" --no-progress "${flags[@]}" || continue
  if [ "$rc" = 0 ] && cp "$workdir/metrics.jsonl" "$out_dir/$part.metrics.jsonl" \
      && "$py" -c "$throughput" "$workdir" "$elapsed" >"$scratch/$part.key" 2>>"$log"; then
    key=$(head -1 "$scratch/$part.key")
    tokens=$(sed -n 's/^tokens_per_second=//p' "$scratch/$part.key")
    if [ $part = train ]; then
      train_seconds=$elapsed train_tokens=$tokens
    elif [ -n "$train_tokens" ]; then
      ratio=$(awk -v a="$tokens" -v b="$train_tokens" 'BEGIN { printf "%.2fx", a / b }')
      key="$key; $ratio the tokens/s of gmm_impl=auto"
    fi
    finish $part "$key"
  elif [ "$rc" = 0 ]; then
    rc=1
    finish $part ""
  else
    finish $part ""
  fi
done

print_table
if any_failed; then
  exit 1
fi
