"""Turns bench/run's measurements into bench/results.md and bench/results.json."""
import datetime
import json
import pathlib
import platform
import subprocess
import sys
import statistics

src, md_path, json_path = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
load = lambda name: json.loads((src / name).read_text())
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
bw = load("bandwidth.json")
results = {"date": str(datetime.date.today()), "machine": {"cpu": cpu, "threads": bw["threads"], "rustc": rustc},
           "bandwidth": bw, "aggregation": [], "training": [], "safetensors": load("safetensors.json"), "simulate": [], "ledger": [], "network": []}
lines = [
    "# Benchmarks", "",
    f"`bench/run`, {results['date']} — {cpu}, {bw['threads']} threads, {rustc}. Every ratio is measured in this one run.",
    "", "## Roofline", "",
    f"STREAM-style kernels over 500M f32 (2 GB per array): copy **{bw['copy_gbs']:.1f} GB/s**, triad **{bw['triad_gbs']:.1f} GB/s**."
    " This machine shares its host: its bandwidth drifts by up to 2× between minutes, so each aggregation row below is"
    " compared with a copy timed in the same loop (a copy of one input, then the aggregation, each repeat).",
    "", "## Weighted aggregation Σ wᵢΔᵢ", "",
    "Bytes moved = N inputs read + 1 output written. Baselines: numpy in Flower's FedAvg style (weight every layer, then"
    " `reduce(np.add)`), torch in Tapestry's `_apply_weighted_deltas` loop. Peak RSS includes the inputs; *extra* is what"
    " aggregating added on top of them.", "",
    "| N × values | weft | share of the copy bandwidth timed beside it | numpy (Flower) | torch (Tapestry) | weft ÷ numpy | weft ÷ torch | extra memory weft / numpy / torch |",
    "|---|---|---|---|---|---|---|---|",
]
for path in sorted(src.glob("agg-weft-*.json"), key=lambda p: tuple(int(x) for x in p.stem.split("-")[2:])):
    _, _, n, length = path.stem.split("-")
    w, npy, tch = load(path.name), load(f"agg-numpy-{n}-{length}.json"), load(f"agg-torch-{n}-{length}.json")
    local_bw = w["copy_gbs"]
    moved = (int(n) + 1) * int(length) * 4
    row = {"n": int(n), "len": int(length), "weft_s": w["seconds"], "numpy_s": npy["seconds"], "torch_s": tch["seconds"],
           "weft_gbs": moved / w["seconds"] / 1e9, "speedup_numpy": npy["seconds"] / w["seconds"],
           "speedup_torch": tch["seconds"] / w["seconds"], "copy_gbs_beside": local_bw, "extra_bytes": [w["overhead_bytes"], npy["overhead_bytes"], tch["overhead_bytes"]]}
    results["aggregation"].append(row)
    mb = lambda b: f"{b / 1e6:.0f} MB"
    lines.append(f"| {n} × {int(length) // 1_000_000}M | {w['seconds'] * 1e3:.1f} ms ({row['weft_gbs']:.1f} GB/s) | "
                 f"{row['weft_gbs'] / local_bw:.0%} of {local_bw:.0f} GB/s | {npy['seconds'] * 1e3:.0f} ms | {tch['seconds'] * 1e3:.0f} ms | "
                 f"**{row['speedup_numpy']:.1f}×** | **{row['speedup_torch']:.1f}×** | "
                 f"{' / '.join(mb(b) for b in row['extra_bytes'])} |")
lines += ["", "64 × 100M (25.6 GB of inputs) does not fit in this machine's 24 GB next to a baseline and is not run.", "",
          "## Local training", "",
          "The built-in trainer against PyTorch on the same architecture (2 layers, 4 heads, width 128, context 64,"
          " tied embeddings, tanh-GELU, pre-norm), batch 16, AdamW with global-norm clipping, same initialisation.", "",
          "| threads | weft tokens/s | PyTorch tokens/s | weft ÷ PyTorch |", "|---|---|---|---|"]
for t in (1, 2):
    w, tch = load(f"train-weft-{t}.json"), load(f"train-torch-{t}.json")
    results["training"].append({"threads": t, "weft": w, "torch": tch})
    lines.append(f"| {t} | {w['tokens_per_s']:,.0f} | {tch['tokens_per_s']:,.0f} | **{w['tokens_per_s'] / tch['tokens_per_s']:.2f}×** |")


def torch_part(op):
    if op in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
        return "linear layers"
    if "scaled_dot_product" in op or "attention" in op:
        return "attention"
    if "gelu" in op:
        return "GELU"
    if "layer_norm" in op:
        return "layer norm"
    if "softmax" in op or "nll_loss" in op or "cross_entropy" in op:
        return "softmax + cross-entropy"
    return "everything else"


def weft_part(kernel):
    return {"matmul": "linear layers", "attention": "attention", "gelu": "GELU", "layernorm": "layer norm",
            "softmax_crossentropy": "softmax + cross-entropy"}.get(kernel.split(".")[0], "everything else")


parts = ["linear layers", "attention", "GELU", "layer norm", "softmax + cross-entropy", "everything else"]
w, tch = load("train-weft-1.json"), load("train-torch-1.json")
w_step, t_step = w["seconds"] / w["steps"], sum(e["seconds_per_step"] for e in tch["profile"])
w_ms = {p: 0.0 for p in parts}
for k in w["profile"]:
    w_ms[weft_part(k["kernel"])] += k["seconds_per_step"] * 1e3
w_ms["everything else"] += (w_step * 1e3) - sum(w_ms.values())
t_ms = {p: 0.0 for p in parts}
for e in tch["profile"]:
    t_ms[torch_part(e["op"])] += e["seconds_per_step"] * 1e3
results["training_profile"] = {"weft_ms_per_step": w_ms, "torch_ms_per_step": t_ms}
lines += ["", "### Where a training step goes (1 thread)", "",
          "weft: wall time of each kernel call (`train_bench --profile`, `weft_model::profile`: a clock read around"
          " each call, in the timed run); *everything else* is the step's time outside the kernels plus AdamW with"
          " clipping, embeddings and residual adds. PyTorch: self CPU time per operator under `torch.profiler` over the"
          " same number of steps, after the timed run (the profiler's own cost is in its figures); *everything else* is"
          " AdamW, clipping, embeddings, residual adds, autograd and the dispatcher.", "",
          "| part of the step | weft ms/step | share | PyTorch ms/step | share | weft ÷ PyTorch time |",
          "|---|---|---|---|---|---|"]
for p in parts:
    ratio = f"{w_ms[p] / t_ms[p]:.2f}" if t_ms[p] > 0 else "—"
    lines.append(f"| {p} | {w_ms[p]:.2f} | {w_ms[p] / (w_step * 1e3):.0%} | {t_ms[p]:.2f} | {t_ms[p] / (t_step * 1e3):.0%} | {ratio} |")
lines.append(f"| **step** | **{w_step * 1e3:.2f}** | | **{t_step * 1e3:.2f}** | | **{w_step / t_step:.2f}** |")
st = results["safetensors"]
lines += ["", "## safetensors and hashing", "",
          f"A 100M-value state (400 MB): encode {st['encode_gbs']:.2f} GB/s, decode {st['decode_gbs']:.2f} GB/s,"
          f" canonical BLAKE3 content hash {st['hash_gbs']:.2f} GB/s.", "",
          "## Cross-device scale (`weft simulate`)", "",
          "| devices | round time (s) | peak RSS |", "|---|---|---|"]
for path in sorted(src.glob("sim-*.json"), key=lambda p: int(p.stem.split("-")[1])):
    sim = load(path.name)
    results["simulate"].append(sim)
    last = sim["rounds"][-1]
    lines.append(f"| {sim['nodes']} | {last['seconds']:.1f} | {(last['peak_rss'] or 0) / 1e6:.1f} MB |")
lines += ["", "## Ledger verification (`weft ledger verify`)", "",
          "A durable consortium with synthetic deltas (examples/ledger_bench.rs); verify checks the chain, every signature and"
          " Merkle root, every blob byte for byte, and replays every aggregation (weighted mean, Nesterov outer optimizer)."
          " Baseline: reading every stored blob once and BLAKE3-hashing it on every core.", "",
          "| nodes × values × rounds | deltas | verify | per round | per GB of deltas | verify ÷ read-and-hash |", "|---|---|---|---|---|---|"]
for path in sorted(src.glob("ledger-*.json")):
    led = load(path.name)
    results["ledger"].append(led)
    lines.append(f"| {led['nodes']} × {led['values'] / 1e6:g}M × {led['rounds']} | {led['delta_bytes'] / 1e9:.2f} GB | {led['verify_seconds']:.2f} s |"
                 f" {led['seconds_per_round']:.3f} s | {led['seconds_per_gb_of_deltas']:.2f} s | {led['verify_over_baseline']:.1f}× |")
lines += ["", "## Network (`weft coordinator serve` / `weft node join` protocol)", "",
          "Separate processes on loopback over mutual TLS (examples/net_bench.rs: the real server and client code; synthetic f32"
          " deltas, a sampled measure). *Wire* = header to last byte spooled to disk; *upload* = until the receipt, which also"
          " covers decoding, hashing, the coordinator's measurement, storing the delta (fsync) and the ledger commit."
          " Goal: ≥ 1 GB/s for a 400 MB delta; coordinator memory must not grow with the number of nodes.", "",
          "| nodes × delta | wire (slowest node) | upload until receipt | coordinator peak RSS |", "|---|---|---|---|"]
for path in sorted(src.glob("net-nodes-*.json"), key=lambda p: (int(p.stem.split("-")[2]), -int(p.stem.split("-")[3]))):
    nodes_, length = path.stem.split("-")[2:4]
    n = load(path.name)
    c = load(f"net-coordinator-{nodes_}-{length}.json")
    results["network"].append({"nodes": n, "coordinator": c})
    size = n["bytes_per_node"] / 1e6
    slowest = max(n["upload_seconds"])
    lines.append(f"| {nodes_} × {size:.0f} MB | {n['wire_gbs']:.2f} GB/s | {int(nodes_) * n['bytes_per_node'] / slowest / 1e9:.2f} GB/s"
                 f" ({slowest:.2f} s) | {c['peak_rss'] / 1e6:.0f} MB |")
served = load("overhead-serve.json")
nodes = {p.stem.removeprefix("overhead-node-"): load(p.name) for p in src.glob("overhead-node-*.json")}
lines += ["", "### Round overhead, 8 node processes", "",
          "`weft coordinator serve` and 8 `weft node join` processes (one per language, demo model, 60 local steps) on this"
          " 2-core machine over mutual TLS. Overhead = the round's wall time (open → closed record) minus its slowest node's"
          " training: fetching the base, encoding, signing, upload, the coordinator's checks and measurement of 8 deltas,"
          " aggregation, storage and ledger.", "",
          "| round | round wall time | slowest node's training | overhead |", "|---|---|---|---|"]
results["round_overhead"] = {"serve": served, "nodes": nodes}
for rnd in served["rounds"]:
    r = rnd["round"]
    wall = served["round_seconds"][str(r)]
    train = max(o["train_seconds"] for n in nodes.values() for o in n["rounds"] if o["round"] == r)
    lines.append(f"| {r} | {wall:.2f} s | {train:.2f} s | {wall - train:.2f} s ({(wall - train) / wall:.0%}) |")
pairs = sorted({int(p.stem.split("-")[-1]) for p in src.glob("llama-weft-1-*.json")})
if pairs:
    imported = load("llama-import.json")
    first = load("llama-weft-1-1.json")
    lines += ["", "## Llama (SmolLM2-135M): forward and LoRA training against PyTorch", "",
              f"`weft model import` of the Q4_1 GGUF (dequantize, un-permute Q/K, rebuild the tokenizer, write 540 MB):"
              f" **{imported['seconds']:.1f} s**.", "",
              f"The same weights and the same {first['batch']} × {first['context']} token ids (the French *Debian Reference*):"
              " weft's forward pass (`crates/weft-llama/examples/llama_bench.rs`) against a plain-torch Llama written as"
              " Hugging Face's LlamaForCausalLM computes it (`bench/llama_torch.py`: RMSNorm, rotate-half RoPE,"
              " grouped-query attention through `scaled_dot_product_attention`, SwiGLU, tied head); LoRA training is one"
              " AdamW step of rank-8 adapters on every projection with the base frozen and only B trained, as a node"
              " does, after one untimed warm-up step. Each process times the median of its repeats; the pairs"
              " (weft, then PyTorch) are interleaved and each ratio below is the median of the pairs' ratios"
              f" ({len(pairs)} pairs; the pairs' ratios in brackets).", "",
              "| threads | weft forward tokens/s | PyTorch | weft ÷ PyTorch | weft LoRA training tokens/s | PyTorch | weft ÷ PyTorch | peak RSS weft / PyTorch |",
              "|---|---|---|---|---|---|---|---|"]
    results["llama"] = {"import_seconds": imported["seconds"], "pairs": []}
    med = lambda xs: sorted(xs)[len(xs) // 2] if len(xs) % 2 else sum(sorted(xs)[len(xs) // 2 - 1:len(xs) // 2 + 1]) / 2
    nll_gap = 0.0
    for t in (1, 2):
        runs = [(load(f"llama-weft-{t}-{p}.json"), load(f"llama-torch-{t}-{p}.json")) for p in pairs]
        results["llama"]["pairs"] += [{"threads": t, "weft": w, "torch": tch} for w, tch in runs]
        fwd = [w["forward_tokens_per_s"] / tch["forward_tokens_per_s"] for w, tch in runs]
        trn = [w["train_tokens_per_s"] / tch["train_tokens_per_s"] for w, tch in runs]
        nll_gap = max([nll_gap] + [abs(w["mean_nll"] - tch["mean_nll"]) for w, tch in runs])
        show = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
        gb = lambda b: f"{b / 1e9:.2f} GB"
        lines.append(
            f"| {t} | {med([w['forward_tokens_per_s'] for w, _ in runs]):.0f} | {med([c['forward_tokens_per_s'] for _, c in runs]):.0f} | "
            f"**{med(fwd):.2f}×** ({show(fwd)}) | {med([w['train_tokens_per_s'] for w, _ in runs]):.0f} | "
            f"{med([c['train_tokens_per_s'] for _, c in runs]):.0f} | **{med(trn):.2f}×** ({show(trn)}) | "
            f"{gb(runs[0][0]['peak_rss_bytes'])} / {gb(runs[0][1]['peak_rss_bytes'])} |")
    results["llama"]["max_mean_nll_difference"] = nll_gap
    lines += ["", f"Both compute the same model: their mean next-token loss on these tokens differs by at most"
              f" {nll_gap:.1e} nats (f32 round-off; {first['mean_nll']:.6f} for weft)."]
if (src / "parity.json").exists():
    parity = load("parity.json")
    results.setdefault("llama", {})["transformers_parity"] = parity
    lines += ["", "## SmolLM2 parity with Hugging Face transformers", "",
              f"The held-out text as the coordinator takes it (the French corpus's last 1200 bytes, {parity['tokens']}"
              " tokens, one sequence) through weft's forward pass (`crates/weft-llama/examples/llama_logits.rs`) and"
              " through `transformers.LlamaForCausalLM` in f32 on the same imported weights"
              " (`bench/transformers_parity.py compare`):"
              f" max |logit difference| **{parity['max_abs_logit_diff']:.2e}** (logits up to {parity['logit_scale']:.1f}),"
              f" mean NLL {parity['mean_nll_weft']:.6f} (weft) against {parity['mean_nll_transformers']:.6f}"
              f" (transformers), a difference of {abs(parity['mean_nll_weft'] - parity['mean_nll_transformers']):.1e} nats."
              " The same comparison runs in CI without torch against a committed fixture"
              " (`crates/weft-llama/tests/smollm2.rs`, `forward_matches_transformers_on_the_same_weights`)."]
def jsonl(name):
    return [json.loads(line) for line in (src / name).read_text().splitlines() if line.strip()]


if (src / "secagg-weft-1.jsonl").exists() and (src / "secagg-flower-1.jsonl").exists():
    pairs = sorted(int(p.stem.rsplit("-", 1)[1]) for p in src.glob("secagg-weft-*.jsonl"))
    weft_runs = [jsonl(f"secagg-weft-{p}.jsonl") for p in pairs]
    flower_runs = [jsonl(f"secagg-flower-{p}.jsonl") for p in pairs]
    rows = []
    lines += ["", "## Secure aggregation: masking against Flower's SecAgg+", "",
              "One member's masking (quantize, self mask, k − 1 pairwise masks) and the collector's unmasking with one"
              " member dropped, weft's `secagg_bench` (ChaCha20 streams keyed by 32-byte keys, u32 mod 2^32) against"
              " Flower's own `quantize` and `pseudo_rand_gen` (numpy MT19937 seeded by the key folded to 32 bits),"
              f" the same vector sizes; median of {len(pairs)} interleaved pairs of runs (each run itself a median of 5).",
              "", "| values | members | weft mask | Flower mask | Flower ÷ weft | weft unmask | Flower unmask | bytes on the wire per member (plain f32) |",
              "|---|---|---|---|---|---|---|---|"]
    for i, w in enumerate(weft_runs[0]):
        ws = [run[i] for run in weft_runs]
        fs = [run[i] for run in flower_runs]
        wm = statistics.median(r["mask_seconds"] for r in ws)
        fm = statistics.median(r["mask_seconds"] for r in fs)
        ratio = statistics.median(f["mask_seconds"] / r["mask_seconds"] for f, r in zip(fs, ws))
        wu = statistics.median(r["unmask_seconds_one_dropped"] for r in ws)
        fu = statistics.median(r["unmask_seconds_one_dropped"] for r in fs)
        rows.append({"length": w["length"], "members": w["members"], "weft_mask_seconds": wm, "flower_mask_seconds": fm,
                     "flower_over_weft": ratio, "weft_unmask_seconds": wu, "flower_unmask_seconds": fu,
                     "wire_bytes_per_member": w["wire_bytes_per_member"], "plain_f32_bytes": w["plain_f32_bytes"]})
        lines.append(f"| {w['length']:,} | {w['members']} | {1e3 * wm:.1f} ms | {1e3 * fm:.1f} ms | {ratio:.1f}× |"
                     f" {1e3 * wu:.1f} ms | {1e3 * fu:.1f} ms | {w['wire_bytes_per_member']:,} ({w['plain_f32_bytes']:,}) |")
    results["secure_aggregation"] = rows

pathlib.Path(md_path).write_text("\n".join(lines) + "\n")
pathlib.Path(json_path).write_text(json.dumps(results, indent=1) + "\n")
print("\n".join(lines))
