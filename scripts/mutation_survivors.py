"""Hand-applied mutants, each against the test that must catch it (docs/mutation.md).

The first nine are the survivors of the first mutation test of the suite (21 bugs, 9 got through);
the rest are bugs in functions that mutmut cannot mutate (it skips decorated functions: @property,
@torch.no_grad(), @lru_cache). Each mutant is applied alone to a copy of python/saerecover; the
named tests run against that copy and must fail, and pass on the unmutated copy.

    python scripts/mutation_survivors.py [--list]

A mutant whose original text is no longer in its file fails loudly: update the table to the
refactored code (and keep the test).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (name, file under python/saerecover, original text, mutated text, test node ids)
MUTANTS: list[tuple[str, str, str, str, list[str]]] = [
    ("floor violation without [.]_+", "core/metrics.py",
     "floor = float(torch.clamp(feats.z_def[rows] - feats.z_rec[rows], min=0).norm())",
     "floor = float((feats.z_def[rows] - feats.z_rec[rows]).norm())",
     ["tests/test_exact_metrics.py::test_every_metric_of_a_hand_example",
      "tests/test_exact_metrics.py::test_floor_violation_counts_only_features_pushed_below_their_defended_value"]),
    ("silenced as z_def < eta", "core/metrics.py",
     "silenced = feats.z_def <= eta",
     "silenced = feats.z_def < eta",
     ["tests/test_exact_metrics.py::test_every_metric_of_a_hand_example",
      "tests/test_exact_metrics.py::test_silenced_features_are_those_at_or_below_eta"]),
    ("bootstrap at 90% (alpha not halved)", "runs/stats.py",
     "alpha = (1.0 - level) / 2.0",
     "alpha = (1.0 - level)",
     ["tests/test_exact_stats.py::test_bootstrap_is_the_direct_quantile_of_seeded_resamples",
      "tests/test_exact_stats.py::test_bootstrap_defaults_are_95_percent_2000_resamples_seed_0"]),
    ("C4 rescale may enlarge delta", "core/projection/base.py",
     "torch.clamp(budgets / norms.clamp_min(1e-30), max=1.0)",
     "(budgets / norms.clamp_min(1e-30))",
     ["tests/test_exact_steps.py::test_c4_rescale_never_enlarges_delta"]),
    ("sketch basis without Gram-Schmidt", "core/projection/sketch.py",
     "q = q - (q @ u) * u",
     "q = q",
     ["tests/test_exact_steps.py::test_sketch_basis_is_orthonormal_and_spans_every_probe_vjp"]),
    ("valid flip with a defended score up to 0.5", "experiments/pipeline.py",
     "return finite & (self.base > 0) & ~(self.defended > 0)",
     "return finite & (self.base > 0) & ~(self.defended > 0.5)",
     ["tests/test_exact_filters.py::test_valid_flips_of_hand_scores",
      "tests/test_exact_filters.py::test_ioi_scores_and_flips_at_the_answer_position"]),
    ("strict filter by a majority of orders", "tasks/unlearning.py",
     "ok = (scores > 0).all(dim=1)",
     "ok = (scores > 0).float().mean(dim=1) > 0.5",
     ["tests/test_exact_filters.py::test_strict_filter_keeps_only_questions_right_under_all_24_orders"]),
    ("c1_residual with the Frobenius norm", "core/metrics.py",
     "spectral = torch.linalg.matrix_norm(a64, ord=2)",
     "spectral = torch.linalg.matrix_norm(a64, ord='fro')",
     ["tests/test_exact_metrics.py::test_c1_residual_is_exactly_one_for_a_delta_inside_span_a",
      "tests/test_exact_metrics.py::test_c1_residual_is_one_over_sqrt_two_at_45_degrees"]),
    ("torch Jacobian basis keeps every singular vector", "linalg.py",
     "rank = int((s > rcond * s[0]).sum())",
     "rank = int(s.numel())",
     ["tests/test_exact_steps.py::test_torch_row_space_basis_drops_the_null_direction",
      "tests/test_exact_steps.py::test_jacobian_device_route_on_a_rank_deficient_j"]),
    # decorated functions (mutmut skips them)
    ("non-finite flips: base only (@property)", "experiments/pipeline.py",
     "return ~(torch.isfinite(self.base) & torch.isfinite(self.defended))",
     "return ~torch.isfinite(self.base)",
     ["tests/test_exact_filters.py::test_valid_flips_of_hand_scores"]),
    ("firing counted at z >= 0 (@torch.no_grad)", "tasks/unlearning.py",
     "count += (z > 0).sum(0).double().cpu()",
     "count += (z >= 0).sum(0).double().cpu()",
     ["tests/test_exact_filters.py::test_firing_frequency_counts_real_tokens_only"]),
    ("firing over every token, specials too (@torch.no_grad)", "tasks/unlearning.py",
     "keep = pool_mask(ids, mask, specials).bool()",
     "keep = mask.bool()",
     ["tests/test_exact_filters.py::test_firing_frequency_counts_real_tokens_only"]),
    ("base scores of the last batch dropped (@torch.no_grad)", "tasks/unlearning.py",
     "part = ex.select(list(range(start, min(start + batch_size, len(ex))))).to(model.device)",
     "part = ex.select(list(range(start, min(start + batch_size, len(ex) - 1)))).to(model.device)",
     ["tests/test_exact_filters.py::test_strict_filter_keeps_only_questions_right_under_all_24_orders"]),
    ("TPP rest mean over all texts (@torch.no_grad)", "tasks/tpp.py",
     "rest_mean[c] = ((total - zsum[c]) / max(n - counts[c], 1)).float()",
     "rest_mean[c] = ((total - zsum[c]) / max(n, 1)).float()",
     ["tests/test_exact_filters.py::test_tpp_pooled_stats_and_latent_selection"]),
    ("TPP pooled residual over pads too (@torch.no_grad)", "tasks/tpp.py",
     "xs.append(masked_mean(h.float(), pm).cpu())",
     "xs.append(masked_mean(h.float(), mask.float()).cpu())",
     ["tests/test_exact_filters.py::test_tpp_pooled_stats_and_latent_selection"]),
    ("refusal phrases matched inside words (@lru_cache)", "tasks/refusal/judge.py",
     'out.append((p, re.compile(r"(?<![0-9a-z_])" + re.escape(norm))))',
     "out.append((p, re.compile(re.escape(norm))))",
     ["tests/test_refusal_text.py::test_detector_matches_at_word_starts_and_within_the_window"]),
]


def run_tests(package_root: Path, tests: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    return subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def main() -> int:
    if "--list" in sys.argv:
        for name, path, *_, tests in MUTANTS:
            print(f"{name} ({path}) -> {', '.join(t.split('::')[1] for t in tests)}")
        return 0
    src = ROOT / "python" / "saerecover"
    failures = 0
    with tempfile.TemporaryDirectory(prefix="saerecover-mutant-") as tmp:
        dst = Path(tmp) / "saerecover"
        all_tests = sorted({t for *_, tests in MUTANTS for t in tests})
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        start = time.time()
        rc = run_tests(Path(tmp), all_tests)
        print(f"unmutated copy: {'tests pass' if rc == 0 else f'TESTS FAIL (exit {rc})'} ({time.time() - start:.0f} s)")
        failures += rc != 0
        for name, path, old, new, tests in MUTANTS:
            target = dst / path
            text = (src / path).read_text(encoding="utf-8")
            if text.count(old) != 1:
                print(f"SKIPPED  {name}: the original text occurs {text.count(old)} times in {path}; update the table")
                failures += 1
                continue
            target.write_text(text.replace(old, new), encoding="utf-8")
            start = time.time()
            rc = run_tests(Path(tmp), tests)
            target.write_text(text, encoding="utf-8")
            caught = rc == 1
            failures += not caught
            print(f"{'caught  ' if caught else 'MISSED  '} {name} ({path}; {time.time() - start:.0f} s)"
                  f"{'' if caught else f' pytest exit {rc}'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
