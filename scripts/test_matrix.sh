#!/usr/bin/env bash
# The test matrix (DESIGN.md §8): the suite on every supported Python x {floor, pinned} torch.
#
#   scripts/test_matrix.sh [OUT]          # or: make test-matrix [MATRIX_OUT=...]
#
# OUT (default runs/test_matrix) receives one venv per cell (kept, so a rerun reuses it), a JUnit
# XML and a log per cell, and summary.md. Each cell installs the CPU build of torch from
# TORCH_INDEX first, then sparseopt[test,examples] under constraints.txt (torch stays), and runs
# pytest. The exit status is 1 if a cell failed or could not be installed.
#
# Environment:
#   PYTHONS      Pythons to run: versions (found with `uv python find`, pyenv or pythonX.Y) or
#                paths. Default: the "Programming Language :: Python :: 3.X" classifiers.
#   TORCHES      torch versions, or "floor" (pyproject's torch>=) and "pinned" (constraints.txt).
#                Default: "floor pinned" (one cell when they are equal).
#   TORCH_INDEX  where the CPU torch wheels come from. Default: https://download.pytorch.org/whl/cpu
#                (pip's configured find-links and extra indexes are consulted too). PyPI is never
#                asked for torch: its Linux wheels are CUDA builds with several GB of libraries.
#   PYTEST_ARGS  extra pytest arguments, e.g. "-x tests/test_contract.py". Default: none.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$(mkdir -p "${1:-runs/test_matrix}" && cd "${1:-runs/test_matrix}" && pwd)
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}

classifier_pythons() {
  sed -n 's/.*"Programming Language :: Python :: \(3\.[0-9]*\)".*/\1/p' pyproject.toml | tr '\n' ' '
}
PYTHONS=${PYTHONS:-$(classifier_pythons)}
FLOOR=$(sed -n 's/.*"torch>=\([0-9.]*\)".*/\1/p' pyproject.toml | head -1)
PINNED=$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' constraints.txt | head -1)
[[ $FLOOR =~ ^[0-9]+\.[0-9]+$ ]] && FLOOR=$FLOOR.0
TORCHES=${TORCHES:-floor pinned}

find_python() {  # a version or a path -> an interpreter path, or nothing
  local want=$1 p
  if [[ $want == */* ]]; then [[ -x $want ]] && echo "$want"; return; fi
  if command -v uv >/dev/null && p=$(uv python find --no-project "$want" 2>/dev/null); then
    echo "$p"; return
  fi
  for p in "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/"$want"*/bin/python \
           "$(command -v "python$want" 2>/dev/null)"; do
    if [[ -x $p ]]; then echo "$p"; return; fi
  done
}

torches=()
for t in $TORCHES; do
  case $t in floor) t=$FLOOR ;; pinned) t=$PINNED ;; esac
  [[ " ${torches[*]-} " == *" $t "* ]] || torches+=("$t")
done

IS_CPU_BUILD='
import importlib.metadata as m, sys
cuda = [r for r in m.requires("torch") or [] if r.startswith(("nvidia", "cuda"))]
version = m.version("torch")
if cuda:
    sys.exit(f"ERROR: torch {version} is a CUDA build (needs {cuda[0]}); "
             "set TORCH_INDEX to an index with CPU builds")
'

summary=$OUT/summary.md
{
  echo "# Test matrix ($(date -u +%Y-%m-%dT%H:%MZ), $(uname -m))"
  echo
  echo "| Python | torch | result | tests | seconds |"
  echo "| --- | --- | --- | --- | ---: |"
} >"$summary"
status=0
for want in $PYTHONS; do
  py=$(find_python "$want")
  for torch in "${torches[@]}"; do
    if [[ -z $py ]]; then
      echo "| $want | $torch | skipped: no interpreter found | | |" >>"$summary"
      continue
    fi
    ver=$("$py" -c 'import platform; print(platform.python_version())')
    cell=py$ver-torch$torch
    venv=$OUT/venvs/$cell
    log=$OUT/$cell.log
    echo "== $cell ($py)"
    start=$SECONDS
    if [[ ! -f $venv/.installed ]]; then
      rm -rf "$venv"
      # constraints.txt with this cell's torch
      sed "s/^torch==.*/torch==$torch/" constraints.txt >"$OUT/$cell.constraints.txt"
      # torch alone first, without its dependencies: a CUDA build would pull GBs of libraries
      if ! { "$py" -m venv "$venv" &&
             "$venv/bin/python" -m pip install -q --upgrade pip &&
             "$venv/bin/python" -m pip install -q --retries 1 --timeout 30 --no-deps \
               --index-url "$TORCH_INDEX" "torch==$torch" &&
             "$venv/bin/python" -c "$IS_CPU_BUILD" &&
             "$venv/bin/python" -m pip install -q --constraint "$OUT/$cell.constraints.txt" \
               -e ".[test,examples]"; } >"$log" 2>&1; then
        why=$(grep -o -m1 -E "Failed to resolve '[^']*'|No matching distribution.*|ERROR: torch.*CUDA build.*" "$log" ||
              grep -m1 ERROR "$log")
        why=${why:0:140}
        echo "| $ver | $torch | **install failed**: ${why:-see $cell.log} | | $((SECONDS - start)) |" >>"$summary"
        status=1
        continue
      fi
      touch "$venv/.installed"
    fi
    got=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
    # shellcheck disable=SC2086
    (cd "$ROOT" && "$venv/bin/python" -m pytest -q -p no:cacheprovider \
      --junitxml "$OUT/$cell.xml" ${PYTEST_ARGS:-}) >>"$log" 2>&1
    rc=$?
    counts=$("$venv/bin/python" - "$OUT/$cell.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET

try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("no report")
    raise SystemExit
s = root if root.tag == "testsuite" else root.find("testsuite")
n, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
print(f"{n - f - e - k} passed, {f} failed, {e} errors, {k} skipped")
EOF
)
    result=$([[ $rc == 0 ]] && echo pass || echo "**FAIL** (rc $rc)")
    [[ $rc == 0 ]] || status=1
    echo "| $ver | $got | $result | $counts | $((SECONDS - start)) |" >>"$summary"
  done
done
cat "$summary"
exit $status
