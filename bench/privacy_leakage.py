#!/usr/bin/env python3
"""Measures what each privacy tier buys and costs: plants a random secret several times in one
node's corpus, runs `weft demo` under each tier, and measures the secret's exposure (the "secret
sharer" rank metric, Carlini et al. 2019) in the shared base and in that node's contribution,
plus the held-out loss each tier costs. Writes docs/privacy.md's measured table.

    python3 bench/privacy_leakage.py [--seed N] [--insertions K] [--quick]

Needs only the Python standard library and a release build (it runs `cargo build --release`).
"""
import argparse
import json
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
WEFT = ROOT / "target/release/weft"
EXPOSURE = ROOT / "target/release/examples/exposure"
PREFIX = "The account PIN that Ada keeps in her notebook is "
NODE, LANGUAGE = "node-en", "en"
MODEL = {"layers": 2, "heads": 4, "width": 64, "context": 64}

TIERS = [
    ("no privacy", []),
    ("DP-SGD, ε = 64", ["--privacy", "dp", "--epsilon", "64"]),
    ("DP-SGD, ε = 8", ["--privacy", "dp", "--epsilon", "8"]),
    ("DP-SGD, ε = 2", ["--privacy", "dp", "--epsilon", "2"]),
    # 4 nodes in communities of at least 3: one community of all four.
    ("secure aggregation (communities of ≥ 3)", ["--secure-aggregation", "3"]),
]


def build():
    subprocess.run(["cargo", "build", "--release", "-p", "weft", "-p", "weft-model", "--example", "exposure"],
                   cwd=ROOT, check=True)


def planted_data(work, secret, insertions, seed, corpus_bytes):
    """A copy of data/ whose en corpus is cut to its first `corpus_bytes` bytes and holds the
    secret sentence `insertions` times, each at the start of a random line."""
    data = work / "data"
    shutil.copytree(ROOT / "data" / "udhr", data / "udhr")
    shutil.copytree(ROOT / "data" / "canaries", data / "canaries")
    (data / "corpora").mkdir(parents=True)
    for corpus in (ROOT / "data" / "corpora").glob("*.txt"):
        shutil.copy(corpus, data / "corpora" / corpus.name)
    path = data / "corpora" / f"{LANGUAGE}.txt"
    text = path.read_bytes()[:corpus_bytes].decode("utf-8", errors="ignore")
    lines = text.split("\n")
    rng = random.Random(seed)
    for _ in range(insertions):
        lines.insert(rng.randrange(len(lines)), f"{PREFIX}{secret}.")
    path.write_text("\n".join(lines), encoding="utf-8")
    return data


def exposure(model, secret, delta=None):
    args = [str(EXPOSURE), str(model), *(str(MODEL[k]) for k in ("layers", "heads", "width", "context")), PREFIX, secret]
    if delta is not None:
        args.append(str(delta))
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def ledger(out):
    shown = subprocess.run([str(WEFT), "ledger", "show", str(out / "coordinator"), "--json"], check=True,
                           capture_output=True, text=True).stdout
    return json.loads(shown)


def run_tier(work, data, name, flags, seed):
    out = work / "".join(c if c.isalnum() else "_" for c in name)
    report = out / "report.json"
    started = time.monotonic()
    subprocess.run([str(WEFT), "demo", "--seed", str(seed), "--data", str(data), "--out", str(out),
                    "--json", str(report), *flags], check=True, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    return out, json.loads(report.read_text()), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--insertions", type=int, default=100)
    parser.add_argument("--corpus-bytes", type=int, default=10**9, help="cut the node's corpus to this many bytes")
    parser.add_argument("--digits", type=int, default=4)
    parser.add_argument("--tiers", type=int, default=len(TIERS), help="run only the first N tiers")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "privacy-leakage.json")
    args = parser.parse_args()
    build()
    rng = random.Random(1_000_003 + args.seed)
    secret = "".join(rng.choice("0123456789") for _ in range(args.digits))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        data = planted_data(work, secret, args.insertions, args.seed, args.corpus_bytes)
        for name, flags in TIERS[:args.tiers]:
            out, report, seconds = run_tier(work, data, name, flags, args.seed)
            rounds = report["rounds"]
            last = rounds[-1]["round"]
            bases = out / "coordinator" / "bases"
            base = bases / f"round-{last:04}.safetensors"
            # What the coordinator received from the node in the last round: its own update, or
            # under secure aggregation its community's mean; scored on the base it was made from.
            sender = NODE
            for entry in ledger(out):
                event = entry["event"]
                if event.get("communities_drawn", {}).get("round") == last:
                    sender = next(c for c, members in event["communities_drawn"]["communities"].items() if NODE in members)
            record = next(c for c in rounds[-1]["contributions"] if c["node"] == sender)
            received = out / "coordinator" / "blobs" / f"{record['delta_hash']}.safetensors"
            previous = bases / f"round-{last - 1:04}.safetensors"
            charges = [c.get("privacy") for r in rounds for c in r["contributions"] if c["node"] == NODE]
            final = report["final_heldout_loss"]
            rows.append({
                "tier": name,
                "epsilon_spent": charges[-1]["epsilon_total"] if charges and charges[-1] else None,
                "exposure_base": exposure(base, secret),
                "received_from": sender,
                "exposure_contribution": exposure(previous, secret, received),
                "heldout_loss_mean": sum(final.values()) / len(final),
                "heldout_loss": final,
                "seconds": seconds,
            })
            print(json.dumps(rows[-1]), file=sys.stderr)
    result = {"seed": args.seed, "insertions": args.insertions, "corpus_bytes": args.corpus_bytes, "digits": args.digits, "prefix": PREFIX,
              "node": NODE, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    write_doc(result)


def write_doc(result):
    """Puts the table into docs/privacy.md between its leakage markers."""
    doc = ROOT / "docs" / "privacy.md"
    text = doc.read_text(encoding="utf-8")
    begin, end = "<!-- leakage:begin -->", "<!-- leakage:end -->"
    if begin not in text or end not in text:
        print(f"{doc} has no leakage markers; table not written there", file=sys.stderr)
        return
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    setup = (f"Secret: `{result['prefix']}` + {result['digits']} random digits, planted {result['insertions']} times in "
             f"{result['node']}'s corpus (cut to {result['corpus_bytes']} bytes); seed {result['seed']}; "
             f"`weft demo` defaults otherwise (4 nodes, 3 rounds of 60 steps). Produced by `python3 bench/privacy_leakage.py "
             f"--insertions {result['insertions']} --corpus-bytes {result['corpus_bytes']}`; raw figures in docs/privacy-leakage.json.")
    doc.write_text(f"{head}{begin}\n{setup}\n\n{table(result)}\n{end}{tail}", encoding="utf-8")


def table(result):
    base = result["rows"][0]["heldout_loss_mean"]
    top = result["digits"] * 3.321928
    lines = [
        f"| tier | ε spent by {result['node']} (δ = 1e-5) | exposure in what the coordinator received from it (bits, max {top:.1f}) "
        f"| exposure in the shared base (bits) | held-out loss, mean of 4 languages (nats/byte) | cost | demo time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        eps = "—" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.2f}"
        cost = r["heldout_loss_mean"] / base - 1
        lines.append(
            f"| {r['tier']} | {eps} | {r['exposure_contribution']['exposure_bits']:.1f} (rank {r['exposure_contribution']['rank']}) "
            f"| {r['exposure_base']['exposure_bits']:.1f} (rank {r['exposure_base']['rank']}) "
            f"| {r['heldout_loss_mean']:.4f} | {100 * cost:+.1f}% | {r['seconds']:.0f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
