#!/usr/bin/env bash
# The prepared GPU check: the CUDA test subset and the step-overhead, update-cost, compiled-step
# and structured-inference benchmarks on one GPU, in under 8 minutes: every step has its own time
# limit, and the limits add up to 480 s.
# The distributed tests are not in the subset: on one GPU their ranks run on gloo on the CPU.
#
#   benchmarks/gpu_check.sh [OUT]        # or: make gpu-check [GPU_CHECK_OUT=...]
#
# OUT (default runs/gpu_check) receives: tests-*.xml (JUnit), <benchmark>.md and .json (tables),
# <step>.log, summary.json (one entry per step: command, exit status, seconds) and summary.md.
# Without a GPU (or with GPU_CHECK_CPU=1) it is a CPU smoke run of the same steps: a few device
# tests, every benchmark with --quick (about 35 s of CPU time; its limits are generous, for a
# busy machine). GPU_CHECK_PYTHON picks the interpreter (default .venv/bin/python, else
# python3). Exit status 1 if a step failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
PY=${GPU_CHECK_PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=python3

if [[ ${GPU_CHECK_CPU:-0} != 1 ]] &&
   "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  MODE=gpu
  DEV=cuda
  # name  limit(s)  command
  STEPS=(
    "tests-sup 100 -m pytest -q -p no:cacheprovider --device cuda --junitxml $OUT/tests-sup.xml tests/test_devices.py tests/test_superposition.py tests/test_suptickets_resume.py tests/test_resume.py tests/test_amp.py tests/test_scheduler.py"
    "tests-contract 100 -m pytest -q -p no:cacheprovider --device cuda --junitxml $OUT/tests-contract.xml tests/test_contract.py tests/test_invariants.py"
    "tests-kernels 30 -m pytest -q -p no:cacheprovider --device cuda --junitxml $OUT/tests-kernels.xml tests/test_sparse_kernels.py"
    "tests-export 35 -m pytest -q -p no:cacheprovider --device cuda --junitxml $OUT/tests-export.xml -m cuda tests/test_export.py"
    "step_overhead 55 benchmarks/step_overhead.py --device cuda --threads 1 --repeats 20 --big-repeats 10 --iter-repeats 30 --json $OUT/step_overhead.json"
    "update_cost 60 benchmarks/update_cost.py --device cuda --threads 1 --sizes 1,16,64 --repeats 3 --big-repeats 2 --via-step 16 --json $OUT/update_cost.json"
    "compiled_step 65 benchmarks/compiled_step.py --device cuda --threads 1 --sizes resnet50 --repeats 20 --json $OUT/compiled_step.json"
    "structured_inference 35 benchmarks/structured_inference.py --shapes 1024x1024 --sparsities 0.9 --batches 1 --threads 1 --repeats 5 --gpu-shapes 4096x4096,8192x8192 --gpu-batches 1,256 --json $OUT/structured_inference.json"
  )
else
  MODE=cpu-smoke
  DEV=cpu
  STEPS=(
    "tests-sup 300 -m pytest -q -p no:cacheprovider --device cpu --junitxml $OUT/tests-sup.xml tests/test_devices.py -k seed_gives_the_same_masks"
    "tests-kernels 300 -m pytest -q -p no:cacheprovider --device cpu --junitxml $OUT/tests-kernels.xml tests/test_sparse_kernels.py -k semi_structured_on_cuda"
    "step_overhead 300 benchmarks/step_overhead.py --device cpu --quick --json $OUT/step_overhead.json"
    "update_cost 300 benchmarks/update_cost.py --device cpu --quick --json $OUT/update_cost.json"
    "compiled_step 300 benchmarks/compiled_step.py --device cpu --quick --json $OUT/compiled_step.json"
    "structured_inference 300 benchmarks/structured_inference.py --quick --json $OUT/structured_inference.json"
  )
fi

echo "gpu_check: mode $MODE, device $DEV, python $PY, out $OUT"
status=0
entries=()
for step in "${STEPS[@]}"; do
  read -r name limit cmd <<<"$step"
  start=$SECONDS
  # shellcheck disable=SC2086
  timeout --kill-after=10 "$limit" "$PY" $cmd >"$OUT/$name.log" 2>&1
  rc=$?
  secs=$((SECONDS - start))
  case $rc in
    0) result=pass ;;
    124 | 137) result=timeout; status=1 ;;
    *) result=fail; status=1 ;;
  esac
  if [[ $name != tests-* && $rc == 0 ]]; then  # the benchmark's markdown tables
    sed -n '/^## /,$p' "$OUT/$name.log" >"$OUT/$name.md"
  fi
  echo "  $name: $result (rc $rc, ${secs}s, limit ${limit}s)"
  entries+=("{\"step\": \"$name\", \"result\": \"$result\", \"rc\": $rc, \"seconds\": $secs, \"limit_s\": $limit, \"command\": \"$PY $cmd\"}")
done

{
  echo "{\"mode\": \"$MODE\", \"device\": \"$DEV\", \"ok\": $([[ $status == 0 ]] && echo true || echo false),"
  echo " \"steps\": ["
  for i in "${!entries[@]}"; do
    sep=$([[ $i -lt $((${#entries[@]} - 1)) ]] && echo "," || echo "")
    echo "  ${entries[$i]}$sep"
  done
  echo "]}"
} >"$OUT/summary.json"

{
  echo "# GPU check ($MODE, $DEV, $(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  "$PY" - "$OUT" <<'EOF'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
summary = json.loads((out / "summary.json").read_text())
print("| step | result | seconds | tests |")
print("| --- | --- | ---: | --- |")
for s in summary["steps"]:
    tests = ""
    xml = out / f"{s['step']}.xml"
    if xml.exists():
        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        n, f, e, k = (int(suite.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
        tests = f"{n - f - e - k} passed, {f} failed, {e} errors, {k} skipped"
    print(f"| {s['step']} | {s['result']} | {s['seconds']} | {tests} |")
for s in summary["steps"]:
    md = out / f"{s['step']}.md"
    if md.exists():
        print()
        print(md.read_text().rstrip())
EOF
} >"$OUT/summary.md"
echo "gpu_check: $([[ $status == 0 ]] && echo ok || echo FAILED); see $OUT/summary.md"
exit $status
