#!/usr/bin/env bash
# The support matrix: cells of Python x torch x dependency versions, each in its own cached
# venv, each running a set of tests; one row per cell goes to compat/results.tsv and the
# table in compat/MATRIX.md (and README.md's copy, unless CI=true).
#
#   bash scripts/compat.sh --ci      cheap cells (what .ci/run runs): pure-Python unit tests on
#                                    Pythons 3.10, 3.12, 3.13 without torch (3.11 is the main
#                                    suite's), and the minimum-
#                                    versions cell (every floor of pyproject.toml, oldest Python)
#   bash scripts/compat.sh --heavy   release cells: Python 3.12 / 3.13 with current torch, the
#                                    newest torch (CUDA wheels from PyPI, several GB each)
#   bash scripts/compat.sh CELL...   the named cells (see CELLS below)
#
# Venvs live in ${HTR_COMPAT_CACHE:-~/.cache/hydra-torchrun-callback/compat}/<cell>, rebuilt
# only when the cell's spec changes. A failing cell fails the script (after all cells ran).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
CACHE="${HTR_COMPAT_CACHE:-$HOME/.cache/hydra-torchrun-callback/compat}"
mkdir -p "$CACHE" compat

PURE_TESTS="tests/test_units.py tests/test_support.py tests/test_pickling.py tests/test_no_torch.py \
tests/test_sweep_units.py"
CORE_TESTS="tests/test_single_node.py tests/test_failures.py tests/test_fail_closed.py \
tests/test_multinode_local.py tests/test_pickling.py tests/test_support.py tests/test_units.py \
tests/test_stacks.py tests/test_hostile.py tests/test_coordination.py tests/test_torchrun_parity.py \
tests/test_sweeps.py tests/test_sweep_units.py tests/test_warm_fork.py tests/test_elastic.py \
--deselect tests/test_multinode_local.py::test_lightning_on_two_emulated_nodes"
OPTUNA_TEST="tests/test_ecosystem.py::test_optuna_study_over_ddp_trials"
NOVERSIONS="$(printf '\t-%.0s' 1 2 3 4 5 6)"
TOOLS="pytest==8.3.5 pytest-timeout==2.3.1 pyyaml"
FLOOR_DEPS="hydra-core==1.3.2 omegaconf==2.3.0 cloudpickle==2.2.1 submitit==1.5.0 \
hydra-submitit-launcher==1.2.0 hydra-optuna-sweeper==1.3.0"
# The other cells pin nothing: pip installs the newest versions pyproject.toml admits.

# name | python | torch requirement ("" = none: pure tests) | other requirements | tests | kind
CELLS=(
  "unit-py3.10|3.10||.|$PURE_TESTS|ci"
  "unit-py3.12|3.12||. hydra-core==1.3.2 omegaconf==2.3.0 cloudpickle==3.0.0|$PURE_TESTS|ci"
  "unit-py3.13|3.13||.|$PURE_TESTS|ci"
  "refused-py3.9|3.9||.|-|ci"
  "floors-py3.10|3.10|torch==2.4.1|.[submitit,optuna] $FLOOR_DEPS|$CORE_TESTS $OPTUNA_TEST|ci"
  "py3.12-torch2.13|3.12|torch==2.13.0|.[submitit,optuna]|$CORE_TESTS $OPTUNA_TEST|heavy"
  "py3.13-torch2.13|3.13|torch==2.13.0|.[submitit]|$CORE_TESTS|heavy"
  "py3.11-torch2.15|3.11|torch==2.15.0|.[submitit,optuna]|$CORE_TESTS $OPTUNA_TEST|heavy"
)

find_python() {  # python3.X that really runs (pyenv shims may exist without the version)
  local v="$1" cand
  for cand in "$(command -v "python$v" 2>/dev/null)" \
    "$(pyenv root 2>/dev/null)"/versions/"$v".*/bin/"python$v" \
    /usr/bin/"python$v" /usr/local/bin/"python$v"; do
    if [ -n "$cand" ] && [ -x "$cand" ] && "$cand" -c "" 2>/dev/null; then
      echo "$cand"
      return 0
    fi
  done
  return 1
}

run_cell() {
  local name="$1" pyver="$2" torch="$3" reqs="$4" tests="$5"
  local py venv stamp spec start status summary versions
  start=$(date +%s)
  if ! py="$(find_python "$pyver")"; then
    if [ "$tests" = - ]; then  # nothing to refuse on a machine without that Python
      record "$name" "$pyver$NOVERSIONS" "not run" "no python$pyver on this machine" 0
      return 0
    fi
    record "$name" "$pyver$NOVERSIONS" failed "no python$pyver on this machine" 0
    return 1
  fi
  venv="$CACHE/$name"
  spec="$torch | $reqs | $TOOLS | $($py --version 2>&1)"
  stamp="$venv/.htr-spec"
  echo "== cell $name: python $pyver, ${torch:-no torch}, $reqs"
  if [ "$tests" = - ]; then  # an interpreter below requires-python: pip must refuse it
    refused="$("$py" -m pip install --dry-run --no-deps "$ROOT" 2>&1)"
    if grep -q "requires a different Python" <<<"$refused"; then
      status=passed summary="pip refuses: requires a different Python"
    else
      status=failed summary="pip did not refuse Python $pyver"
    fi
    echo "   $status: $summary"
    record "$name" "$("$py" -c 'import platform; print(platform.python_version())')$NOVERSIONS" \
      "$status" "$summary" $(( $(date +%s) - start ))
    [ "$status" = passed ]
    return
  fi
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$spec" ]; then
    rm -rf "$venv"
    "$py" -m venv "$venv" || { record "$name" "$pyver$NOVERSIONS" failed "venv failed" 0; return 1; }
    (
      set -e
      . "$venv/bin/activate"
      python -m pip install -q --upgrade pip
      # torch first and explicitly (a range could pull another build); PIP_CONSTRAINT lifts
      # a machine-wide pip cap on torch, if any (the newest-torch cell needs that).
      if [ -n "$torch" ]; then
        PIP_CONSTRAINT=/dev/null python -m pip install -q "$torch"
      fi
      if [ -z "$torch" ]; then  # no torch: the package alone and its pure-Python needs
        python -m pip install -q --no-deps "$ROOT"
        local pins="${reqs#.}"  # pinned versions, if the cell names any
        # shellcheck disable=SC2086
        python -m pip install -q ${pins:-hydra-core omegaconf cloudpickle} $TOOLS
      else
        local -a args=()
        for req in $reqs; do  # "." and ".[extras]" stand for this checkout
          case "$req" in .) args+=("$ROOT") ;; .\[*) args+=("$ROOT${req#.}") ;; *) args+=("$req") ;; esac
        done
        # shellcheck disable=SC2086  # word splitting wanted
        PIP_CONSTRAINT=/dev/null python -m pip install -q "$torch" "${args[@]}" $TOOLS
      fi
    ) >"$venv.install.log" 2>&1 || {
      echo "install failed, see $venv.install.log"; tail -5 "$venv.install.log"
      rm -f "$stamp"
      record "$name" "$pyver$NOVERSIONS" failed "install failed" $(( $(date +%s) - start ))
      return 1
    }
    echo "$spec" >"$stamp"
  else  # cached venv: only our own package is reinstalled
    "$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$ROOT" >/dev/null 2>&1
  fi
  versions="$("$venv/bin/python" - <<'EOF'
from importlib import metadata
import platform
def v(n):
    try: return metadata.version(n)
    except metadata.PackageNotFoundError: return "-"
names = ["torch", "hydra-core", "omegaconf", "cloudpickle", "submitit", "hydra-submitit-launcher"]
print(platform.python_version() + "\t" + "\t".join(v(n) for n in names))
EOF
)"
  # shellcheck disable=SC2086
  summary="$(cd "$ROOT" && HTR_COMPAT_CELL="$name" "$venv/bin/python" -m pytest -q \
    -p no:cacheprovider $tests 2>&1 | tee "$CACHE/$name.log" | tail -1)"
  status=${PIPESTATUS[0]}
  [ "$status" = 0 ] && status=passed || status=failed
  summary="$(grep -E '[0-9]+ (passed|failed|error)' <<<"$summary" | sed -E 's/ in [0-9.]+s.*//; s/^=+ //')"
  echo "   $status: ${summary:-no pytest summary (see $CACHE/$name.log)}"
  record "$name" "$versions" "$status" "${summary:-see log}" $(( $(date +%s) - start ))
  [ "$status" = passed ]
}

record() {  # name, versions (tab-separated), status, pytest summary, seconds
  local file=compat/results.tsv
  touch "$file"
  awk -F'\t' -v n="$1" '$1 != n' "$file" >"$file.tmp"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$(date -u +%F)" >>"$file.tmp"
  sort -o "$file" "$file.tmp" && rm -f "$file.tmp"
}

render() {  # compat/results.tsv -> compat/MATRIX.md (and README.md's copy unless CI)
  {
    echo "| cell | Python | torch | hydra-core | omegaconf | cloudpickle | submitit | hydra-submitit-launcher | result | tests | time | run on |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
    awk -F'\t' '{printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %ss | %s |\n", $1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12}' compat/results.tsv
  } >compat/MATRIX.md
  if [ "${CI:-}" != true ] && grep -q '<!-- compat-matrix:start -->' README.md; then
    python3 - <<'EOF'
import re
from pathlib import Path
readme = Path("README.md")
table = Path("compat/MATRIX.md").read_text()
text = re.sub(r"(<!-- compat-matrix:start -->\n).*?(<!-- compat-matrix:end -->)",
              lambda m: m.group(1) + table + m.group(2), readme.read_text(), flags=re.S)
readme.write_text(text)
EOF
  fi
}

selected=()
case "${1:-}" in
  --ci) for c in "${CELLS[@]}"; do [ "${c##*|}" = ci ] && selected+=("$c"); done ;;
  --heavy) for c in "${CELLS[@]}"; do [ "${c##*|}" = heavy ] && selected+=("$c"); done ;;
  "") echo "usage: $0 --ci | --heavy | CELL..." >&2; exit 2 ;;
  *) for want in "$@"; do
       found=""
       for c in "${CELLS[@]}"; do [ "${c%%|*}" = "$want" ] && selected+=("$c") && found=1; done
       [ -n "$found" ] || { echo "unknown cell $want" >&2; exit 2; }
     done ;;
esac

failed=0
for cell in "${selected[@]}"; do
  IFS='|' read -r name pyver torch reqs tests _kind <<<"$cell"
  run_cell "$name" "$pyver" "$torch" "$reqs" "$tests" || failed=1
done
render
cat compat/MATRIX.md
exit "$failed"
