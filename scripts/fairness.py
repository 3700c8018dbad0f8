#!/usr/bin/env python3
"""Fairness across languages: today's mean-quality rule, q-FedAvg-style weighting and weft's
every-language rule, side by side on the same runs.

Runs `weft demo` once per rule and configuration (same seed, same data, same everything else)
and writes docs/fairness.md: per language the held-out loss at round 0 and after the last round,
the worst language's change, and the rounds in which any language's held-out loss rose by more
than the tolerance (0.5 %, relative). Usage: scripts/fairness.py [--out docs/fairness.md]
"""
import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
BINARY = ROOT / "target" / "release" / "weft"
TOLERANCE = 0.005
CONFIGS = [
    ("nine languages, three scripts (`--nodes 9`)", ["--nodes", "9"]),
    ("two Latin, two CJK (`--languages it,pt,ja,zh-cn --nodes 4`)", ["--languages", "it,pt,ja,zh-cn", "--nodes", "4"]),
    ("the default four (`weft demo`)", []),
    ("English, Indonesian and two CJK (`--languages en,id,ja,zh-cn --nodes 4`)", ["--languages", "en,id,ja,zh-cn", "--nodes", "4"]),
]
RULES = [
    ("mean (weft before: languages averaged)", ["--fairness", "mean"]),
    ("q-FedAvg-style, q = 1", ["--fairness", "q-fedavg:1"]),
    ("q-FedAvg-style, q = 5", ["--fairness", "q-fedavg:5"]),
    ("**every-language** (default)", []),
]


SEEDS = [0, 1]


def run(args, workdir, name):
    path = pathlib.Path(workdir) / f"{name}.json"
    cmd = [str(BINARY), "demo", *args, "--json", str(path)]
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr}")
    return json.loads(path.read_text())


def summary(report):
    initial = report["initial_heldout_loss"]
    final = report["final_heldout_loss"]
    change = {l: (final[l] - initial[l]) / initial[l] for l in initial}
    previous = initial
    regressed = []
    for rnd in report["rounds"]:
        loss = rnd["heldout_loss"]
        risen = {l: (loss[l] - previous[l]) / previous[l] for l in loss if (loss[l] - previous[l]) / previous[l] > TOLERANCE}
        if risen:
            worst = max(risen, key=risen.get)
            regressed.append(f"{rnd['round']} ({worst} +{100 * risen[worst]:.1f}%)")
        previous = loss
    moved = sum(1 for rnd in report["rounds"] if rnd["base_changed"])
    return initial, change, regressed, moved


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "docs" / "fairness.md"))
    args = parser.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "weft"], cwd=ROOT, check=True)
    started = time.time()
    sections = []
    headline = []
    with tempfile.TemporaryDirectory() as work:
        for c, (title, config) in enumerate(CONFIGS):
            rows = []
            worst_by_rule = {}
            languages = None
            for r, (rule, flags) in enumerate(RULES):
                print(f"fairness: {title} / {rule}", file=sys.stderr)
                report = run([*config, *flags], work, f"{c}-{r}")
                initial, change, regressed, moved = summary(report)
                languages = languages or list(report["initial_heldout_loss"].keys())
                worst = max(change, key=change.get)
                worst_by_rule[rule] = [change[worst]]
                for seed in SEEDS[1:]:
                    other = run([*config, *flags, "--seed", str(seed)], work, f"{c}-{r}-{seed}")
                    _, other_change, _, _ = summary(other)
                    worst_by_rule[rule].append(max(other_change.values()))
                cells = [f"{100 * change[l]:+.1f}%" + (" ✗" if change[l] >= 0 else "") for l in languages]
                rows.append(f"| {rule} | " + " | ".join(cells) + f" | {worst} {100 * change[worst]:+.1f}% | "
                            f"{', '.join(regressed) or 'none'} | {moved} of {len(report['rounds'])} |")
            start = " · ".join(f"{l} {initial[l]:.3f}" for l in languages)
            header = "| rule | " + " | ".join(languages) + " | worst language | rounds with a language up > 0.5 % | rounds the base moved |"
            sep = "|---" * (len(languages) + 4) + "|"
            sections += [f"### {title}", "", f"Round 0 (nats/byte): {start}.", "", header, sep, *rows, ""]
            new = worst_by_rule["**every-language** (default)"]
            cells = []
            for i, seed in enumerate(SEEDS):
                best_other = min(v[i] for k, v in worst_by_rule.items() if "every-language" not in k)
                cells += [f"{100 * new[i]:+.1f}%", f"{100 * best_other:+.1f}%"]
            headline.append(f"| {title} | " + " | ".join(cells) + " |")
    minutes = (time.time() - started) / 60
    text = [
        "# Fairness across languages: every language gains",
        "",
        f"Regenerate with `scripts/fairness.py` (builds the release binary, then runs {len(CONFIGS) * len(RULES) * len(SEEDS)} demos; "
        f"{minutes:.0f} minutes on the 2-core development machine).",
        "",
        "Each cell is the change of that language's held-out loss (UDHR, nats/byte) from round 0 to the last round "
        "of the same `weft demo` run (seed 0, 3 rounds, the default model, nodes and policy otherwise): lower is better, "
        "✗ marks a language that ended worse than it started. *Rounds with a language up* lists the rounds in which "
        "some language's held-out loss rose by more than 0.5 % (relative) over the round before — the tolerance of the "
        "every-language rule — with the worst one.",
        "",
        "The rules (`--fairness`; every other setting is the default):",
        "",
        "* **mean** — weft before this rule: a contribution's quality is its mean relative gain over languages; the "
        "floor and the weights read that mean; nothing is checked per language.",
        "* **q-FedAvg-style** — as *mean*, with every weight multiplied by `Lᵢ^q`, `Lᵢ` the current base's held-out "
        "loss on node i's language (the reweighting of q-FFL, Li et al., *Fair Resource Allocation in Federated "
        "Learning*, ICLR 2020; Flower's `QFedAvg`): worse-off languages weigh more. q = 1 and q = 5.",
        "* **every-language** — admission on the best language's gain, language-balanced weights, and the "
        "per-language check of every round's base with a searched language priority "
        "([policy.rs](../crates/weft-core/src/policy.rs), [language_check.rs](../crates/weft-core/src/language_check.rs)).",
        "",
        "Worst language's change over the run, with the seed of the tables below (0) and another (1) — "
        "\"best of the others\" is, for each seed, the best worst-language change of mean and both q-FedAvg settings:",
        "",
        "| configuration | every-language, seed 0 | best of the others, seed 0 | every-language, seed 1 | best of the others, seed 1 |",
        "|---|---|---|---|---|",
        *headline,
        "",
        *sections,
        "## Units: why relative gains",
        "",
        "Held-out losses are reported in nats per byte, what the byte model predicts. They are not comparable "
        "across scripts: a Chinese or Japanese character is 3 UTF-8 bytes, a Latin letter 1, and languages differ in "
        "how predictable their text is. Bits per character would reweight languages by bytes per character, "
        "which is no fairer. So every decision reads **relative** changes — the fraction of a language's own "
        "held-out loss a contribution removes, or a round adds. A ratio of two losses on the same text is the "
        "same in nats or bits, per byte or per character: every language counts alike, whatever its script.",
        "",
    ]
    pathlib.Path(args.out).write_text("\n".join(text))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
