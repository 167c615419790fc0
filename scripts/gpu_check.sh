#!/usr/bin/env bash
# Check the torchrun callback on this machine's NVIDIA GPUs and print a short report:
#   1. one job, nproc_per_node=gpu: a worker per GPU, an NCCL all_reduce
#   2. a sweep x=1,2 on 2 emulated nodes (submitit_local, one task = one node) sharing the
#      GPUs: nproc_per_node=gpu counts the host's GPUs, each node runs half of them
#   3. in every job of runs 1 and 2, no two workers on this host share a GPU (by UUID)
#   4. rank 0's CUDA tensors reach the Hydra process as CPU tensors, CUDA untouched there
#   5. the warm server the workers are forked from (start_method=forkserver, the default)
#      has one thread and no CUDA library mapped (each worker does map it)
#   6. an app that imports torch at module top: the warm server is a fork of the Hydra
#      process (torch imported once per node), still one thread and no CUDA library
#   7. an app that calls torch.cuda.is_available() at import (--cpu: starts a thread at
#      import): the Hydra process is not safe to fork (the CUDA driver is loaded), the
#      server is a fresh interpreter, the log says why
# The app is scripts/gpu_check_app.py. Exit status: 0 passed, 1 a check failed, 2 no GPU.
#   bash scripts/gpu_check.sh          # needs nvidia-smi and a CUDA build of torch
#   bash scripts/gpu_check.sh --cpu    # tests this harness without GPUs: the same runs and
#       checks with gloo and CPU tensors, 2 GPUs pretended by CUDA_VISIBLE_DEVICES=0,1 (the
#       callback reads it to place workers; the app never touches CUDA), check 3 then compares
#       the cuda:LOCAL_RANK each worker would take
# Python: $PYTHON, else the repo's .venv, else python3; this checkout's code is what runs.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=$repo/.venv/bin/python
else PY=python3
fi
cpu=0
[ "${1:-}" = "--cpu" ] && cpu=1
die() { echo "gpu_check: $*" >&2; exit 2; }

if [ $cpu = 0 ]; then
  hint="(bash scripts/gpu_check.sh --cpu runs the checks without a GPU)"
  command -v nvidia-smi >/dev/null || die "no NVIDIA GPU: nvidia-smi is not on PATH $hint"
  nvidia-smi -L >/dev/null 2>&1 || die "no NVIDIA GPU: 'nvidia-smi -L' failed $hint"
  gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())') \
    || die "$PY cannot import torch"
  [ "$gpus" -gt 0 ] || die "no NVIDIA GPU visible to torch: torch.cuda.device_count() == 0" \
    "(torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')," \
    "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}) $hint"
else
  gpus=2
  export CUDA_VISIBLE_DEVICES=0,1
fi
per_node=$((gpus / 2))

echo "== gpu_check ($([ $cpu = 1 ] && echo "--cpu: gloo, CPU tensors" || echo NCCL)) on $(hostname)"
"$PY" - <<'EOF'
import torch
nccl = "n/a"
if torch.cuda.is_available():
    version = torch.cuda.nccl.version()
    nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {nccl}")
print(f"{torch.cuda.device_count()} GPU(s)")
for i in range(torch.cuda.device_count()):
    print(f"  cuda:{i} {torch.cuda.get_device_name(i)}")
EOF
[ $cpu = 0 ] || echo "(--cpu: 2 GPUs pretended, CUDA_VISIBLE_DEVICES=0,1)"

out=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
export PYTHONPATH="$repo:$repo/scripts${PYTHONPATH:+:$PYTHONPATH}" HYDRA_FULL_ERROR=1
failed=0 notes=()

# run NAME [-m] OVERRIDES...: run the app; log in $out/NAME.log, job records in NAME.jsonl.
run() {
  local name=$1 start rc
  shift
  start=$(date +%s.%N)
  timeout "${GPU_CHECK_TIMEOUT:-600}" "$PY" scripts/gpu_check_app.py "$@" \
    hydra/callbacks=torchrun hydra.callbacks.torchrun.nproc_per_node=gpu \
    "cpu=$([ $cpu = 1 ] && echo true || echo false)" \
    +hydra.callbacks.gpu_report._target_=gpu_check_app.Report \
    "+hydra.callbacks.gpu_report.path=$out/$name.jsonl" >"$out/$name.log" 2>&1
  rc=$?
  secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f s", b - a }')
  [ $rc = 0 ] || { failed=1; notes+=("$name exited with status $rc: $out/$name.log"); }
}

# check LABEL RUN WHAT JOBS WORLD [TIME]: a check of RUN's job records, made by the report.
checks=()
check() { checks+=("$1" "$2" "$3" "$4" "$5" "${6:-}"); }

echo "-- running (outputs in $out)"
run run1 "hydra.run.dir=$out/run1"
time1=$secs
if [ $per_node -ge 1 ]; then
  # Without gpus_per_node, submitit_local hides every GPU (CUDA_VISIBLE_DEVICES="").
  run run2 -m "hydra.sweep.dir=$out/run2" x=1,2 hydra/launcher=submitit_local \
    hydra.launcher.tasks_per_node=2 "hydra.launcher.gpus_per_node=$((2 * per_node))" \
    hydra.launcher.timeout_min=30
  time2=$secs
fi
export GPU_CHECK_AT_IMPORT=torch
run run3 "hydra.run.dir=$out/run3"
time3=$secs
GPU_CHECK_AT_IMPORT=$([ $cpu = 1 ] && echo thread || echo available)
run run4 "hydra.run.dir=$out/run4"
time4=$secs
unset GPU_CHECK_AT_IMPORT

echo "-- report"
check "1 all_reduce, 1 node x $gpus worker(s)" run1 collective 1 $gpus "$time1"
if [ $per_node -ge 1 ]; then
  check "2 sweep x=1,2, 2 nodes x $per_node worker(s)" run2 collective 2 $((2 * per_node)) "$time2"
else
  check "2 sweep on 2 emulated nodes" - "1 GPU: two nodes would share it" 0 0
fi
for what in devices return warm; do
  for name in run1 run2; do
    [ -e "$out/$name.log" ] || continue
    world=$gpus jobs=1
    [ $name = run2 ] && world=$((2 * per_node)) jobs=2
    label="3 one device per worker ($name)"
    [ $what = return ] && label="4 tensor returned on the CPU ($name)"
    [ $what = warm ] && label="5 warm server: no CUDA, 1 thread ($name)"
    check "$label" $name $what $jobs $world
  done
done
check "6 torch at top: forked warm server (run3)" run3 warm-fork 1 $gpus "$time3"
check "7 $([ $cpu = 1 ] && echo "thread" || echo "cuda.is_available()") at import: fresh server (run4)" run4 \
  warm-fresh 1 $gpus "$time4"
"$PY" scripts/gpu_check_app.py --report "$out" "$cpu" "${checks[@]}" || failed=1
for note in "${notes[@]}"; do
  echo "   $note"
  tail -n 15 "${note##* }" | sed 's/^/     | /'
done
if [ $failed = 0 ]; then echo "gpu_check: all checks PASS"; else echo "gpu_check: FAILED"; fi
exit $failed
