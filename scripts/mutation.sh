#!/usr/bin/env bash
# Mutation testing (slow; not part of CI): how many small deliberate bugs in the code that computes
# numbers the test suite catches. docs/mutation.md has the scores, the survivors and why.
#
#   scripts/mutation.sh python   mutmut on the number-computing Python functions (SCOPE below)
#   scripts/mutation.sh python-again  after new tests: rerun only the mutants the last `python` run
#                                did not kill (and those of functions changed since), keeping the rest
#   scripts/mutation.sh rust     cargo-mutants on rust_core with its own unit tests
#   scripts/mutation.sh rust-again  after new Rust tests: only the mutants the last runs did not catch
#   scripts/mutation.sh survivors  the hand-applied mutants of docs/mutation.md, each against its test
#   scripts/mutation.sh all      all three (the default)
#
# Needs: pip install -e ".[mutation]" (mutmut), cargo install cargo-mutants --locked, and the
# compiled extension python/saerecover/_core*.so (maturin develop, or scripts/test.sh).
# Environment: MUTATION_JOBS (parallel mutants, default: CPU count), MUTATION_DIR (work directory,
# default .mutation/ in the repository; it is wiped first), MUTATION_RUST_TIMEOUT (seconds per
# mutant's tests; default: cargo-mutants' own, from the unmutated tests' time).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WHAT="${1:-all}"
JOBS="${MUTATION_JOBS:-$(nproc)}"
WORK="${MUTATION_DIR:-$ROOT/.mutation}"

# The functions whose mutants count, as mutmut mutant-name globs (module.x_function or
# module.xǁClassǁmethod). Modules that are mostly I/O or orchestration contribute only their
# numeric functions. mutmut 3 never mutates decorated functions (@property, @torch.no_grad(),
# @lru_cache): those are covered by the hand-applied mutants ("survivors" below).
SCOPE=(
  "saerecover.core.metrics.*"
  "saerecover.core.decomposition.*"
  "saerecover.core.checkpoints.*"
  "saerecover.core.recovery.*"
  "saerecover.core.projection*"
  "saerecover.runs.stats.*"
  "saerecover.linalg.x_*"
  "saerecover.linalg.xǁEncoderNullProjectorǁ__init__*"
  "saerecover.linalg.xǁEncoderNullProjectorǁapply*"
  "saerecover.linalg.xǁEncoderNullProjectorǁ_apply_torch_device*"
  "saerecover.linalg.xǁEncoderNullProjectorǁ_device_basis*"
  "saerecover.linalg.xǁBatchedJacobianNullǁ*"
  "saerecover.core.clamp.xǁSiteClampǁapply*"
  "saerecover.core.clamp.xǁSiteClampǁdefend*"
  "saerecover.core.clamp.xǁClampǁ__init__*"
  "saerecover.core.clamp.xǁClampǁ_add*"
  "saerecover.core.clamp.xǁClampǁper_feature*"
  "saerecover.core.clamp.xǁClampǁcombine*"
  "saerecover.core.clamp.xǁClampǁat__*"
  "saerecover.experiments.pipeline.x_behavior_scores*"
  "saerecover.experiments.pipeline.x__score_chunk*"
  "saerecover.experiments.pipeline.x_find_flips*"
  "saerecover.models.memory.*"
  "saerecover.experiments.analysis.x_compare_value*"
  "saerecover.experiments.analysis.x__tensor_diff*"
  "saerecover.experiments.analysis.x__json_float*"
  "saerecover.experiments.analysis.x__h_rec*"
  "saerecover.experiments.analysis.x__model_dtype*"
  "saerecover.experiments.analysis.x__aggregate*"
  "saerecover.experiments.analysis.x__mean*"
  "saerecover.experiments.sweeps.x_robustness*"
  "saerecover.experiments.sweeps.x_check_grid*"
  "saerecover.experiments.refusal.x_refusal_summary*"
  "saerecover.experiments.refusal.x__wilson*"
  "saerecover.tasks.ioi.xǁIOIǁscore*"
  "saerecover.tasks.ioi.xǁIOIǁloss*"
  "saerecover.tasks.tpp.xǁProbedModelǁforward*"
  "saerecover.tasks.tpp.xǁTPPTaskǁscore*"
  "saerecover.tasks.tpp.xǁTPPTaskǁloss*"
  "saerecover.tasks.tpp.x_latent_scores*"
  "saerecover.tasks.tpp.x_top_latents*"
  "saerecover.tasks.text.x_pool_mask*"
  "saerecover.tasks.text.x_masked_mean*"
  "saerecover.tasks.text.x_special_ids*"
  "saerecover.tasks.unlearning.xǁMultipleChoiceǁletter_logits*"
  "saerecover.tasks.unlearning.xǁMultipleChoiceǁscore*"
  "saerecover.tasks.unlearning.xǁMultipleChoiceǁloss*"
  "saerecover.tasks.unlearning.x_strict_filter*"
  "saerecover.tasks.unlearning.x_select_by_frequency*"
  "saerecover.tasks.refusal.judge.*"
  "saerecover.tasks.refusal.task.xǁRefusalǁanswered*"
  "saerecover.tasks.refusal.task.xǁRefusalǁjudge*"
  "saerecover.tasks.refusal.task.xǁRefusalǁresponse_weights*"
  "saerecover.tasks.refusal.task.xǁRefusalǁtoken_logprobs*"
  "saerecover.tasks.refusal.task.xǁRefusalǁscore*"
  "saerecover.tasks.refusal.task.xǁRefusalǁrefusal_logprob*"
  "saerecover.tasks.refusal.task.xǁRefusalǁloss*"
)

python_mutants() {
  local so
  so=$(find "$ROOT/python/saerecover" -maxdepth 1 -name '_core*.so' -print -quit)
  [ -n "$so" ] || { echo "python/saerecover/_core*.so is missing: build it first (maturin develop)" >&2; exit 2; }
  # mutmut expects the package at the top of its directory (./, src/ or source/): stage a copy
  # with saerecover/ next to tests/ and pyproject.toml ([tool.mutmut] is written for that layout)
  rm -rf "$WORK/python"
  mkdir -p "$WORK/python/mutants"
  (cd "$ROOT/python" && tar --exclude=__pycache__ -cf - saerecover) | tar -xf - -C "$WORK/python"
  (cd "$ROOT" && tar --exclude=__pycache__ -cf - tests pyproject.toml) | tar -xf - -C "$WORK/python"
  cd "$WORK/python"
  # the mutated copy, not an installed saerecover, must be the one imported; one thread per
  # worker (mutmut's time limits are CPU seconds, and idle OpenMP threads spin)
  export PYTHONPATH="$WORK/python/mutants" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
  local start=$SECONDS status=0
  mutmut run --max-children "$JOBS" "${SCOPE[@]}" || status=$?
  echo "mutmut run: exit $status after $((SECONDS - start)) s"
  mutmut results --all true > results.txt
  # per module: killed / (mutants - equivalent), the equivalent survivors set apart by the rules
  # of scripts/mutation_score.py; --list prints each mutant not killed with its diff
  python3 "$ROOT/scripts/mutation_score.py" "$WORK/python" "${SCOPE[@]}" --results results.txt --list
}

python_again() {
  # mutmut keeps each verdict with the hash of its function, so a killed mutant of an unchanged
  # function stays killed when tests are only added; the survivors are named and so rerun
  [ -d "$WORK/python/mutants" ] || { echo "no earlier run in $WORK/python: run '$0 python' first" >&2; exit 2; }
  cd "$WORK/python"
  rm -rf saerecover tests pyproject.toml
  (cd "$ROOT/python" && tar --exclude=__pycache__ -cf - saerecover) | tar -xf -
  (cd "$ROOT" && tar --exclude=__pycache__ -cf - tests pyproject.toml) | tar -xf -
  # a changed test selection makes mutmut discard every verdict; only added tests are wanted
  # here. Which tests reach which function is collected again (the verdicts stay in the .meta
  # files): changed code reaches other functions, and mutmut would trace only the new tests
  python3 - <<'PY'
import hashlib, json, tomllib
selection = tomllib.load(open("pyproject.toml", "rb"))["tool"]["mutmut"]["pytest_add_cli_args_test_selection"]
state = json.load(open("mutants/mutmut-stats.json"))
state["config_fingerprint"]["test_selection"] = hashlib.sha256(repr(tuple(selection)).encode()).hexdigest()[:12]
state["tests_by_mangled_function_name"], state["duration_by_test"] = {}, {}
json.dump(state, open("mutants/mutmut-stats.json", "w"))
PY
  export PYTHONPATH="$WORK/python/mutants" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
  mutmut results --all true > results.txt
  mapfile -t again < <(python3 - "${SCOPE[@]}" <<'PY'
import fnmatch, re, sys
for line in open("results.txt", encoding="utf-8"):
    m = re.match(r"\s*(\S+): (.+?)\s*$", line)
    if m and m.group(2) in ("survived", "no tests", "not checked") and any(fnmatch.fnmatch(m.group(1), g) for g in sys.argv[1:]):
        print(m.group(1))
PY
)
  echo "rerunning ${#again[@]} mutants"
  local start=$SECONDS status=0
  [ "${#again[@]}" -eq 0 ] || mutmut run --max-children "$JOBS" "${again[@]}" || status=$?
  echo "mutmut run: exit $status after $((SECONDS - start)) s"
  mutmut results --all true > results.txt
  python3 "$ROOT/scripts/mutation_score.py" "$WORK/python" "${SCOPE[@]}" --results results.txt --list
}

rust_mutants() {
  # rerun=1: after new tests, only the mutants not caught before (cargo-mutants --iterate keeps
  # the earlier outcomes in mutants.out and adds the new ones)
  local rerun="${1:-0}"
  command -v cargo-mutants > /dev/null || { echo "cargo-mutants is missing: cargo install cargo-mutants --locked" >&2; exit 2; }
  if [ "$rerun" = 1 ] && [ ! -d "$WORK/rust/mutants.out" ]; then
    echo "no earlier run in $WORK/rust: run '$0 rust' first" >&2; exit 2
  fi
  # a copy of the crate, mutated in place there (the checkout is never touched); its target/
  # persists between runs, so only the first run builds the optimised dependencies; the copied
  # files get the current time (tar -m), or cargo would keep a build newer than an older source
  mkdir -p "$WORK/rust"
  (cd "$ROOT" && tar -cf - Cargo.toml Cargo.lock rust_core benches) | tar -xmf - -C "$WORK/rust"
  cd "$WORK/rust"
  local iterate=()
  if [ "$rerun" = 1 ]; then iterate=(--iterate); else rm -rf mutants.out mutants.out.old; fi
  local start=$SECONDS status=0
  # python.rs is the pyo3 binding, compiled only with the "python" feature and tested through
  # the Python suite, so the Rust unit tests cannot see it (docs/mutation.md)
  # without MUTATION_RUST_TIMEOUT, cargo-mutants sets the limit from the unmutated tests' time
  # (at least 20 s; they take about a second): a mutant that loops is given up on soon
  local limit=()
  [ -z "${MUTATION_RUST_TIMEOUT:-}" ] || limit=(--timeout "$MUTATION_RUST_TIMEOUT")
  cargo mutants --in-place --profile mutants "${limit[@]}" \
    --exclude rust_core/python.rs --cargo-test-arg=--lib "${iterate[@]}" || status=$?
  echo "cargo mutants: exit $status after $((SECONDS - start)) s (2 = some mutants missed, 3 = timeouts)"
  for f in caught missed timeout unviable; do
    printf '%-9s %5d\n' "$f" "$(wc -l < mutants.out/$f.txt)"
  done
  echo "missed: $WORK/rust/mutants.out/missed.txt"
}

survivors() {
  cd "$ROOT"
  python3 scripts/mutation_survivors.py
}

case "$WHAT" in
  python) python_mutants ;;
  python-again) python_again ;;
  rust) rust_mutants ;;
  rust-again) rust_mutants 1 ;;
  survivors) survivors ;;
  all) (survivors); (python_mutants); (rust_mutants) ;;
  *) echo "usage: $0 [python|python-again|rust|rust-again|survivors|all]" >&2; exit 2 ;;
esac
