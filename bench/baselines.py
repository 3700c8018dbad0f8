"""Python baselines for bench/run, each printing one JSON line.

  aggregate-numpy N LEN REPEATS  Flower's FedAvg style: reduce(np.add) over weighted layers
  aggregate-torch N LEN REPEATS  Tapestry's _apply_weighted_deltas loop in torch
  robust-numpy N LEN REPEATS     np.median and trimmed mean via np.sort along the node axis
  train-torch TEXT THREADS STEPS [LAYERS HEADS WIDTH CONTEXT BATCH]
                                 the built-in trainer's architecture and optimizer in PyTorch
"""
import json
import resource
import sys
import time
from functools import reduce


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def best(repeats, f):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def deltas(np, n, length):
    j = np.arange(length, dtype=np.int64)
    return [(((j * 31 + i * 17) % 1000).astype(np.float32) * np.float32(1e-3)) for i in range(n)]


def aggregate_numpy(n, length, repeats):
    import numpy as np
    xs = deltas(np, n, length)
    weights = [1.0 / (n + i) for i in range(n)]
    before = peak_rss()

    def fedavg():
        # Flower's aggregate(): weight every layer, then reduce(np.add) and divide.
        weighted = [x * w for x, w in zip(xs, weights)]
        return reduce(np.add, weighted) / sum(weights)

    seconds = best(repeats, fedavg)
    return {"n": n, "len": length, "seconds": seconds, "peak_rss": peak_rss(), "overhead_bytes": peak_rss() - before,
            "numpy": np.__version__}


def aggregate_torch(n, length, repeats):
    import numpy as np
    import torch
    xs = [torch.from_numpy(x) for x in deltas(np, n, length)]
    base = torch.zeros(length)
    weights = [1.0 / (n + i) for i in range(n)]
    before = peak_rss()

    def tapestry():
        # Tapestry's coordinator._apply_weighted_deltas, one tensor.
        delta = torch.zeros_like(base)
        for x, w in zip(xs, weights):
            delta = delta + x * w
        return base + delta

    seconds = best(repeats, tapestry)
    return {"n": n, "len": length, "seconds": seconds, "peak_rss": peak_rss(), "overhead_bytes": peak_rss() - before,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def robust_numpy(n, length, repeats):
    import numpy as np
    i = np.arange(n, dtype=np.int64)[:, None]
    j = np.arange(length, dtype=np.int64)[None, :]
    # The values robust_bench builds: x[i, j] = ((j·7919 + i·104729) mod 10007) / 10007 − 0.5.
    x = (((j * 7919 + i * 104729) % 10007).astype(np.float32) / np.float32(10007.0) - np.float32(0.5))
    k = int(np.floor(0.2 * n))
    return {"n": n, "len": length, "median_s": best(repeats, lambda: np.median(x, axis=0)),
            "trimmed_mean_s": best(repeats, lambda: np.sort(x, axis=0)[k:n - k].mean(axis=0)), "numpy": np.__version__}


def train_torch(text_path, threads, steps, layers=2, heads=4, width=128, context=64, batch=16):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(width, eps=1e-5)
            self.qkv = nn.Linear(width, 3 * width)
            self.proj = nn.Linear(width, width)
            self.ln_2 = nn.LayerNorm(width, eps=1e-5)
            self.fc = nn.Linear(width, 4 * width)
            self.fc_proj = nn.Linear(4 * width, width)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.qkv(self.ln_1(x)).split(c, dim=2)
            q, k, v = (z.view(b, t, heads, c // heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
            return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))

    class Gpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(256, width)
            self.wpe = nn.Embedding(context, width)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln_f = nn.LayerNorm(width, eps=1e-5)

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.blocks:
                x = block(x)
            return self.ln_f(x) @ self.wte.weight.T  # tied output layer, as weft's

    data = torch.tensor(list(open(text_path, "rb").read()), dtype=torch.long)
    model = Gpt()
    # weft's initialisation (GPT-2's): N(0, 0.02), residual projections scaled by 1/sqrt(2·layers).
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / (2 * layers) ** 0.5 if name.endswith("proj.weight") else 0.02
            torch.nn.init.normal_(p, 0.0, std)
        elif "ln" not in name:
            torch.nn.init.zeros_(p)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(1)

    def step():
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + context] for s in starts])
        y = torch.stack([data[s + 1:s + context + 1] for s in starts])
        loss = F.cross_entropy(model(x).view(-1, 256), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    seconds = time.perf_counter() - t
    tokens = steps * batch * context
    # Where a step's time goes: the same number of steps again under torch.profiler, self CPU
    # time per operator (the profiler's own cost is in these figures; the throughput above is
    # measured without it).
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    profile = sorted(({"op": e.key, "seconds_per_step": e.self_cpu_time_total / 1e6 / steps, "calls": e.count}
                      for e in prof.key_averages() if e.self_cpu_time_total > 0),
                     key=lambda e: -e["seconds_per_step"])
    return {"threads": threads, "parameters": sum(p.numel() for p in model.parameters()), "steps": steps,
            "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "final_loss": loss,
            "torch": torch.__version__, "profile": profile}


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "aggregate-numpy":
        out = aggregate_numpy(*(int(a) for a in args))
    elif cmd == "aggregate-torch":
        out = aggregate_torch(*(int(a) for a in args))
    elif cmd == "robust-numpy":
        out = robust_numpy(*(int(a) for a in args))
    elif cmd == "train-torch":
        out = train_torch(args[0], *(int(a) for a in args[1:]))
    else:
        sys.exit(f"unknown baseline {cmd}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
