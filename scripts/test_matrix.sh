#!/usr/bin/env bash
# The test matrix: the suite on every supported Python x {floor, pinned} torch (README,
# "Supported versions"), after the tests that need the network (pytest -m network).
#
#   scripts/test_matrix.sh [OUT]          # or: make test-matrix [MATRIX_OUT=...]
#
# OUT (default runs/test_matrix) receives one venv per cell (kept, so a rerun reuses it), a JUnit
# XML and a log per cell, and summary.md. First it runs the tests marked `network`, which the
# default suite deselects (tests/test_constraints.py: uv resolves constraints.txt for every
# declared Python), once, with NETWORK_PYTHON; they skip with uv's reason where the registry
# cannot be fetched, and the summary says so. Then each cell makes a venv with uv, installs
# `torch==X` and sparseopt[test,examples] under constraints.txt (with this cell's torch pin), and
# runs pytest as `make test` does. The exit status is 1 if the network tests or a cell failed, or
# a cell could not be installed.
#
# uv reads the system's TLS certificates here (UV_SYSTEM_CERTS=1, and UV_NATIVE_TLS=1 for an
# older uv), as pip does, so a proxy whose certificate authority the system trusts works; set
# either variable yourself to choose otherwise.
#
# Where torch comes from: the package registry (PyPI), unless TORCH_INDEX names another index.
# PyPI's Linux x86_64 wheels are CUDA builds: about 4.5 GB per venv, of which the CUDA libraries
# are shared between the cells of one torch version (uv hard-links them from its cache), and they
# run on a machine without a GPU like the CPU build does. The summary names each cell's build.
#
# Environment:
#   PYTHONS      Pythons to run: versions (found with `uv python find`, pyenv or pythonX.Y) or
#                paths. Default: the "Programming Language :: Python :: 3.X" classifiers.
#   TORCHES      torch versions, or "floor" (pyproject's torch>=) and "pinned" (constraints.txt).
#                Default: "floor pinned" (one cell when they are equal).
#   TORCH_INDEX  an index preferred for torch, e.g. https://download.pytorch.org/whl/cpu for the
#                CPU builds (about 1 GB per venv). Default: none, the registry's builds.
#   UV           the uv to use. Default: uv on PATH, else .venv/bin/uv (`make venv` installs it).
#   PYTEST_ARGS  extra pytest arguments, e.g. "-x tests/test_contract.py". Default: none.
#   NETWORK_PYTHON  the interpreter of the network tests (it needs pytest and uv: the test extra).
#                Default: .venv/bin/python (`make venv`); "" skips them.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$(mkdir -p "${1:-runs/test_matrix}" && cd "${1:-runs/test_matrix}" && pwd)
TORCH_INDEX=${TORCH_INDEX:-}
UV=${UV:-$(command -v uv || echo "$ROOT/.venv/bin/uv")}
if [[ ! -x $UV ]]; then
  echo "ERROR: scripts/test_matrix.sh needs uv: run \`make venv\` (it installs uv) or pip install uv" >&2
  exit 2
fi

classifier_pythons() {
  sed -n 's/.*"Programming Language :: Python :: \(3\.[0-9]*\)".*/\1/p' pyproject.toml | tr '\n' ' '
}
PYTHONS=${PYTHONS:-$(classifier_pythons)}
FLOOR=$(sed -n 's/.*"torch>=\([0-9.]*\)".*/\1/p' pyproject.toml | head -1)
PINNED=$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' constraints.txt | head -1)
[[ $FLOOR =~ ^[0-9]+\.[0-9]+$ ]] && FLOOR=$FLOOR.0
TORCHES=${TORCHES:-floor pinned}
if [[ -z ${UV_SYSTEM_CERTS+x} && -z ${UV_NATIVE_TLS+x} ]]; then
  export UV_SYSTEM_CERTS=1 UV_NATIVE_TLS=1
fi
NETWORK_PYTHON=${NETWORK_PYTHON-$ROOT/.venv/bin/python}

find_python() {  # a version or a path -> an interpreter path, or nothing
  local want=$1 p
  if [[ $want == */* ]]; then [[ -x $want ]] && echo "$want"; return; fi
  if p=$("$UV" python find --no-project --no-python-downloads "$want" 2>/dev/null); then
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

junit_counts() {  # PYTHON XML -> "N passed, F failed, E errors, S skipped" (+ why, if all skipped)
  "$1" - "$2" <<'EOF'
import sys
import xml.etree.ElementTree as ET

try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("no report")
    raise SystemExit
s = root if root.tag == "testsuite" else root.find("testsuite")
n, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
reasons = [x.get("message", "") for x in s.iter("skipped")]
why = f" ({reasons[0][:160]})" if reasons and k == n else ""
print(f"{n - f - e - k} passed, {f} failed, {e} errors, {k} skipped{why}".replace("|", "/"))
EOF
}

summary=$OUT/summary.md
echo "# Test matrix ($(date -u +%Y-%m-%dT%H:%MZ), $(uname -m))" >"$summary"
echo >>"$summary"
status=0

# The network tests, once: they resolve for every declared Python, whatever runs them.
if [[ -z $NETWORK_PYTHON ]]; then
  echo "Network tests: not run (NETWORK_PYTHON is empty)." >>"$summary"
elif [[ ! -x $NETWORK_PYTHON ]]; then
  echo "Network tests: not run: no $NETWORK_PYTHON (\`make venv\` makes it)." >>"$summary"
else
  echo "== network tests ($NETWORK_PYTHON)"
  (cd "$ROOT" && "$NETWORK_PYTHON" -m pytest -q -p no:cacheprovider -m network \
    --junitxml "$OUT/network.xml") >"$OUT/network.log" 2>&1
  rc=$?
  if [[ $rc == 0 ]]; then result=pass; else result="**FAIL** (rc $rc, see network.log)"; status=1; fi
  counts=$(junit_counts "$NETWORK_PYTHON" "$OUT/network.xml")
  echo "Network tests (\`pytest -m network\`): $result, $counts." >>"$summary"
fi
{
  echo
  echo "| Python | torch | result | tests | seconds |"
  echo "| --- | --- | --- | --- | ---: |"
} >>"$summary"
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
      if ! { "$UV" venv -q --python "$py" "$venv" &&
             "$UV" pip install -q --python "$venv/bin/python" \
               --constraint "$OUT/$cell.constraints.txt" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} \
               "torch==$torch" -e ".[test,examples]"; } >"$log" 2>&1; then
        why=$(grep -m1 -i -E "error|because|no solution" "$log")
        why=${why:0:140}
        echo "| $ver | $torch | **install failed**: ${why:-see $cell.log} | | $((SECONDS - start)) |" >>"$summary"
        status=1
        continue
      fi
      touch "$venv/.installed"
    fi
    got=$("$venv/bin/python" -c 'import torch; v = torch.version
print(torch.__version__, "(CUDA build)" if v.cuda else "(CPU build)")')
    # shellcheck disable=SC2086
    (cd "$ROOT" && "$venv/bin/python" -m pytest -q -p no:cacheprovider \
      --junitxml "$OUT/$cell.xml" ${PYTEST_ARGS:-}) >>"$log" 2>&1
    rc=$?
    counts=$(junit_counts "$venv/bin/python" "$OUT/$cell.xml")
    result=$([[ $rc == 0 ]] && echo pass || echo "**FAIL** (rc $rc)")
    [[ $rc == 0 ]] || status=1
    echo "| $ver | $got | $result | $counts | $((SECONDS - start)) |" >>"$summary"
  done
done
cat "$summary"
exit $status
