"""The score of a mutmut run over the scope of scripts/mutation.sh, per module.

    python scripts/mutation_score.py WORK_DIR [GLOB ...]     (WORK_DIR: mutmut's directory, holding mutants/)

Reads the verdicts from ``mutmut results --all true`` (run in WORK_DIR), finds each mutant's
diff in the mutated sources, and sets apart the survivors that no test on this machine can tell
from the original, by the rules below (docs/mutation.md). The score is killed / (mutants -
equivalent). ``--list`` prints every mutant not killed with its diff line and rule.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import re
import subprocess
import sys
from collections import Counter, defaultdict
from difflib import SequenceMatcher
from pathlib import Path

DETECTED = {"killed", "timeout", "segfault", "caught by type check"}

# A device expression: `dev`, `device`, an attribute ending in `.device` (x.device, model.device) or "cpu".
_DEVICE = r"(?:dev|device|[\w.\[\]\"']+\.device|\"cpu\"|'cpu')"
# Factories whose dtype defaults to float32, the dtype they were given.
_F32_FACTORY = re.compile(r"torch\.(?:zeros|ones|empty|full|randn|rand)\(")

#: One-off equivalent mutants, by (original line, mutated line) with surrounding spaces stripped:
#: these give the same result for every input, for the reason given.
EQUIVALENT_LINES = {
    ("return \" \".join(t.split(\" \")[:window])", "return \" \".join(t.split(None)[:window])"):
        "normalize() leaves single spaces only, where split(' ') and split() agree",
    ("toks = _REF_QUALITY_WORD.findall(rec.lower())", "toks = _REF_QUALITY_WORD.findall(rec.upper())"):
        "the unique-token ratio is the same in either case ([A-Za-z0-9_'] maps one to one)",
    ("if excess <= 0:", "if excess < 0:"):
        "at excess 0 the pull-back's gamma is 0 (or the shortening's factor 1): the step itself either way",
    ("gram = j @ j.T if j.shape[0] <= j.shape[1] else j.T @ j",
     "gram = j @ j.T if j.shape[0] < j.shape[1] else j.T @ j"):
        "J J^T and J^T J have the same largest eigenvalue; the choice only saves work",
}

RULES = {
    "device": "a device argument (device=..., .to(<device>), .to(\"cpu\", ...)) dropped or set to None: every "
              "tensor of a CPU-only test run is on the CPU already, so no test here can tell (CUDA runs could)",
    "float32-default": "dtype=torch.float32 of a torch factory (zeros, ones, full, ...) dropped or set to "
                       "None: float32 is torch's default dtype",
    "most-common-first": "Counter.most_common(k)[0] is the most common element for every k >= 1 and None",
    "listed": "a one-off equivalent of EQUIVALENT_LINES",
}


def _tokens(line: str) -> list[str]:
    return re.findall(r"\w+|\S", line)


def equivalence(old: str, new: str) -> str | None:
    """The rule under which a one-line mutant is equivalent here, or None: the lines differ in one
    run of tokens, dropped or replaced by None, and that run is a device or a float32 default."""
    if (old.strip(), new.strip()) in EQUIVALENT_LINES:
        return "listed"
    if re.sub(r"most_common\((?:2|None)\)\[0\]", "most_common(1)[0]", new) == old:
        return "most-common-first"
    ta, tb = _tokens(old), _tokens(new)
    ops = [op for op in SequenceMatcher(None, ta, tb, autojunk=False).get_opcodes() if op[0] != "equal"]
    if len(ops) != 1:
        return None
    _, i1, i2, j1, j2 = ops[0]
    gone, put = "".join(ta[i1:i2]).strip(","), "".join(tb[j1:j2])
    if put not in ("", "None"):
        return None
    if re.fullmatch(rf"(?:device=)?{_DEVICE}", gone):
        return "device"
    as_keyword = gone == "dtype=torch.float32" or (gone == "torch.float32" and ta[max(i1 - 2, 0):i1] == ["dtype", "="])
    if as_keyword and _F32_FACTORY.search(old):
        return "float32-default"
    return None


def function_sources(path: Path) -> dict[str, str]:
    """Every function of a mutated file by name (mutmut's x_f__mutmut_N and x_f__mutmut_orig,
    methods as xǁClassǁname__mutmut_N), as source text."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    out = {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "__mutmut_" in node.name:
            out[node.name] = "\n".join(lines[node.lineno - 1:node.end_lineno])
    return out


def mutant_diff(sources: dict[str, str], name: str) -> tuple[str, str] | None:
    """(original line, mutated line) of a mutant changing one line, else None."""
    short = name.rsplit(".", 1)[1]
    orig = sources.get(short.rsplit("__mutmut_", 1)[0] + "__mutmut_orig")
    mutated = sources.get(short)
    if orig is None or mutated is None:
        return None
    a, b = orig.splitlines()[1:], mutated.splitlines()[1:]  # the def lines differ by name only
    if len(a) != len(b):
        return None
    changed = [(x, y) for x, y in zip(a, b) if x != y]
    return changed[0] if len(changed) == 1 else None


def module_path(work: Path, name: str) -> Path:
    module = re.split(r"\.x[_ǁ]", name)[0]
    return work / "mutants" / (module.replace(".", "/") + ".py")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("globs", nargs="*", help="mutant-name globs that count (default: all)")
    ap.add_argument("--list", action="store_true", help="print every mutant not killed with its diff")
    ap.add_argument("--results", type=Path, help="a saved `mutmut results --all true` (default: run it)")
    args = ap.parse_args()
    text = (args.results.read_text(encoding="utf-8") if args.results else
            subprocess.run(["mutmut", "results", "--all", "true"], cwd=args.work, capture_output=True, text=True,
                           check=True).stdout)
    rows = [m.groups() for m in (re.match(r"\s*(\S+): (.+?)\s*$", line) for line in text.splitlines()) if m]
    rows = [(k, s) for k, s in rows if not args.globs or any(fnmatch.fnmatch(k, g) for g in args.globs)]
    sources: dict[Path, dict[str, str]] = {}
    by_module: dict[str, Counter] = defaultdict(Counter)
    left = []
    for key, status in rows:
        module = re.split(r"\.x[_ǁ]", key)[0]
        if status not in DETECTED and status != "no tests":
            path = module_path(args.work, key)
            if path not in sources:
                sources[path] = function_sources(path) if path.exists() else {}
            diff = mutant_diff(sources[path], key)
            rule = equivalence(*diff) if diff else None
            if rule and status == "survived":
                status = "equivalent"
            left.append((key, status, rule, diff))
        by_module[module][status] += 1
    total: Counter = sum(by_module.values(), Counter())

    def score(c: Counter) -> float:
        n = sum(c.values()) - c["equivalent"]
        return sum(c[s] for s in DETECTED) / n if n else float("nan")

    head = ("module", "mutants", "killed", "survived", "no tests", "equivalent", "score")
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for module, c in [*sorted(by_module.items()), ("**all**", total)]:
        print(f"| {module} | {sum(c.values())} | {sum(c[s] for s in DETECTED)} | {c['survived']} | {c['no tests']} | "
              f"{c['equivalent']} | {score(c):.1%} |")
    print("\nequivalent by rule: " + ", ".join(f"{r} {n}" for r, n in Counter(r for _, s, r, _ in left
                                                                                    if s == "equivalent").items()))
    if args.list:
        for key, status, rule, diff in left:
            print(f"\n{key}: {status}{f' ({rule})' if rule else ''}")
            if diff:
                print(f"  - {diff[0].strip()}\n  + {diff[1].strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
