"""A weft trainer in numpy for the byte-level GPT (full-weight rounds).

It does what weft's built-in trainer does, in another language: the same windows (weft's
SplitMix64 from the job's seed), the same model (GPT-2 blocks, tanh GELU, tied output layer),
the same AdamW (decay on matrices and embeddings, warm-up over the optimizer's life, global
norm clipping), its moments kept in the job's state_dir between rounds. Its update agrees with
weft's to float tolerance (tested: crates/weft-node/tests/reference_trainers.rs); sums run in
another order, so not bit for bit.

usage (as a weft node runs it):
    weft node join KIT --trainer "python3 trainers/numpy_byte_gpt.py"
Needs numpy (trainers/setup installs it into trainers/.venv).
"""

import json
import os
import sys

# One thread: the same job gives the same bits on every run (multi-threaded BLAS may sum in
# another order).
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import weft_trainer as wt  # noqa: E402

F = np.float32
GELU_SCALE = F(0.7978846)
LN_EPS = F(1e-5)
BLOCK = ["ln_1.weight", "ln_1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
         "ln_2.weight", "ln_2.bias", "mlp.fc.weight", "mlp.fc.bias", "mlp.proj.weight", "mlp.proj.bias"]


def names(layers):
    out = ["wte", "wpe"]
    for layer in range(layers):
        out += [f"h.{layer}.{n}" for n in BLOCK]
    return out + ["ln_f.weight", "ln_f.bias"]


def sample(corpus, rows, length, rng):
    """weft's Batch::sample: `rows` windows at uniform offsets; a short window is padding."""
    inputs = np.zeros((rows, length), np.int64)
    targets = np.zeros((rows, length), np.int64)
    mask = np.zeros((rows, length), F)
    span = max(len(corpus) - (length + 1), 0) + 1
    for row in range(rows):
        start = rng.below(span)
        fill(inputs, targets, mask, row, corpus[start:start + length + 1])
    return inputs, targets, mask


def fill(inputs, targets, mask, row, window):
    n = min(max(len(window) - 1, 0), inputs.shape[1])
    if n:
        w = np.frombuffer(window, np.uint8)
        inputs[row, :n] = w[:n]
        targets[row, :n] = w[1:n + 1]
        mask[row, :n] = 1


def layernorm(x, w, b):
    mean = x.mean(-1, keepdims=True, dtype=F)
    var = ((x - mean) ** 2).mean(-1, keepdims=True, dtype=F)
    rstd = F(1) / np.sqrt(var + LN_EPS)
    norm = (x - mean) * rstd
    return norm * w + b, (norm, rstd)


def layernorm_backward(dout, w, cache):
    norm, rstd = cache
    dnorm = dout * w
    dx = (dnorm - dnorm.mean(-1, keepdims=True) - norm * (dnorm * norm).mean(-1, keepdims=True)) * rstd
    axes = tuple(range(dout.ndim - 1))
    return dx, (norm * dout).sum(axes), dout.sum(axes)


def gelu(x):
    return F(0.5) * x * (F(1) + np.tanh(GELU_SCALE * (x + F(0.044715) * x * x * x)))


def gelu_backward(x, dout):
    th = np.tanh(GELU_SCALE * (x + F(0.044715) * x * x * x))
    local = F(0.5) * (F(1) + th) + x * F(0.5) * (F(1) - th * th) * GELU_SCALE * (F(1) + F(3 * 0.044715) * x * x)
    return local * dout


def forward(p, cfg, inputs, targets, mask, want_grads):
    """Σ masked loss (nats) and the number of masked targets; with `want_grads`, also the
    gradients of the mean masked loss."""
    layers, heads, c = cfg["layers"], cfg["heads"], cfg["width"]
    b, t = inputs.shape
    hs = c // heads
    scale = F(1 / np.sqrt(hs))
    causal = np.triu(np.ones((t, t), bool), 1)
    x = p["wte"][inputs] + p["wpe"][:t]
    caches = []
    for layer in range(layers):
        w = {n: p[f"h.{layer}.{n}"] for n in BLOCK}
        ln1, c1 = layernorm(x, w["ln_1.weight"], w["ln_1.bias"])
        qkv = ln1 @ w["attn.qkv.weight"].T + w["attn.qkv.bias"]
        q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(b, t, heads, hs).transpose(0, 2, 1, 3) for i in range(3))
        scores = (q @ k.transpose(0, 1, 3, 2)) * scale
        scores[:, :, causal] = -np.inf
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        y = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, c)
        res2 = x + (y @ w["attn.proj.weight"].T + w["attn.proj.bias"])
        ln2, c2 = layernorm(res2, w["ln_2.weight"], w["ln_2.bias"])
        fch = ln2 @ w["mlp.fc.weight"].T + w["mlp.fc.bias"]
        fch_gelu = gelu(fch)
        res3 = res2 + (fch_gelu @ w["mlp.proj.weight"].T + w["mlp.proj.bias"])
        caches.append((x, ln1, c1, q, k, v, probs, y, res2, ln2, c2, fch, fch_gelu))
        x = res3
    lnf, cf = layernorm(x, p["ln_f.weight"], p["ln_f.bias"])
    logits = lnf @ p["wte"].T
    logits -= logits.max(-1, keepdims=True)
    probs_v = np.exp(logits)
    probs_v /= probs_v.sum(-1, keepdims=True)
    picked = np.take_along_axis(probs_v, targets[..., None], -1)[..., 0]
    real = mask != 0
    loss_sum = float(-np.log(np.maximum(picked[real], np.finfo(F).tiny).astype(np.float64)).sum())
    count = float(mask.sum(dtype=np.float64))
    if not want_grads:
        return loss_sum, count, None
    g = {name: np.zeros_like(value) for name, value in p.items()}
    inv = F(1 / count) if count > 0 else F(0)
    dlogits = probs_v * (mask * inv)[..., None]
    np.put_along_axis(dlogits, targets[..., None],
                      np.take_along_axis(dlogits, targets[..., None], -1) - (mask * inv)[..., None], -1)
    g["wte"] += dlogits.reshape(-1, dlogits.shape[-1]).T @ lnf.reshape(-1, c)
    dx, g["ln_f.weight"], g["ln_f.bias"] = layernorm_backward(dlogits @ p["wte"], p["ln_f.weight"], cf)
    for layer in reversed(range(layers)):
        x_in, ln1, c1, q, k, v, probs, y, res2, ln2, c2, fch, fch_gelu = caches[layer]
        pre = f"h.{layer}."
        w = {n: p[pre + n] for n in BLOCK}
        # res3 = res2 + mlp(ln2(res2))
        g[pre + "mlp.proj.weight"] = dx.reshape(-1, c).T @ fch_gelu.reshape(-1, 4 * c)
        g[pre + "mlp.proj.bias"] = dx.sum((0, 1))
        dfch = gelu_backward(fch, dx @ w["mlp.proj.weight"])
        g[pre + "mlp.fc.weight"] = dfch.reshape(-1, 4 * c).T @ ln2.reshape(-1, c)
        g[pre + "mlp.fc.bias"] = dfch.sum((0, 1))
        dres2, g[pre + "ln_2.weight"], g[pre + "ln_2.bias"] = layernorm_backward(dfch @ w["mlp.fc.weight"],
                                                                                w["ln_2.weight"], c2)
        dres2 += dx
        # res2 = x + attention(ln1(x))
        g[pre + "attn.proj.weight"] = dres2.reshape(-1, c).T @ y.reshape(-1, c)
        g[pre + "attn.proj.bias"] = dres2.sum((0, 1))
        dy = (dres2 @ w["attn.proj.weight"]).reshape(b, t, heads, hs).transpose(0, 2, 1, 3)
        dprobs = dy @ v.transpose(0, 1, 3, 2)
        dv = probs.transpose(0, 1, 3, 2) @ dy
        dscores = probs * (dprobs - (probs * dprobs).sum(-1, keepdims=True)) * scale
        dq = dscores @ k
        dk = dscores.transpose(0, 1, 3, 2) @ q
        dqkv = np.concatenate([d.transpose(0, 2, 1, 3).reshape(b, t, c) for d in (dq, dk, dv)], -1)
        g[pre + "attn.qkv.weight"] = dqkv.reshape(-1, 3 * c).T @ ln1.reshape(-1, c)
        g[pre + "attn.qkv.bias"] = dqkv.sum((0, 1))
        dx_in, g[pre + "ln_1.weight"], g[pre + "ln_1.bias"] = layernorm_backward(dqkv @ w["attn.qkv.weight"],
                                                                                w["ln_1.weight"], c1)
        dx = dres2 + dx_in
    np.add.at(g["wte"], inputs.reshape(-1), dx.reshape(-1, c))
    g["wpe"][:t] += dx.sum(0)
    return loss_sum, count, g


def loss_per_byte(p, cfg, text, rows):
    """weft's Gpt::loss_per_byte: windows of `context` bytes from the start, every byte after
    the first predicted once."""
    t = cfg["context"]
    starts = list(range(0, max(len(text) - 1, 0), t))
    if not starts:
        return float("nan")
    total, count = 0.0, 0.0
    rows = max(1, min(rows, len(starts)))
    for i in range(0, len(starts), rows):
        group = starts[i:i + rows]
        inputs = np.zeros((len(group), t), np.int64)
        targets = np.zeros((len(group), t), np.int64)
        mask = np.zeros((len(group), t), F)
        for row, start in enumerate(group):
            fill(inputs, targets, mask, row, text[start:start + t + 1])
        s, c, _ = forward(p, cfg, inputs, targets, mask, False)
        total, count = total + s, count + c
    return total / count


class AdamW:
    """weft's AdamW, its moments and step count kept in the job's state_dir."""

    def __init__(self, settings, params, state_dir):
        self.s = settings
        self.path = os.path.join(state_dir, "adamw.safetensors")
        self.step = 0
        self.m = {n: np.zeros_like(v) for n, v in params.items()}
        self.v = {n: np.zeros_like(v) for n, v in params.items()}
        if os.path.exists(self.path):
            saved = wt.read_safetensors(self.path)
            with open(os.path.join(state_dir, "adamw.json")) as f:
                self.step = int(json.load(f)["step"])
            for n in params:
                if saved.get("m." + n) is None or saved["m." + n].shape != params[n].shape:
                    raise wt.JobError(f"{self.path}: the saved moments do not fit the model ({n})")
                self.m[n], self.v[n] = saved["m." + n], saved["v." + n]

    def update(self, params, grads):
        s = self.s
        norm = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
        clip = F(s["clip_norm"] / norm) if s["clip_norm"] > 0 and norm > s["clip_norm"] else F(1)
        self.step += 1
        warm = F(1) if s["warmup_steps"] == 0 else min(F(self.step) / F(s["warmup_steps"]), F(1))
        lr = F(s["lr"]) * warm
        b1, b2, eps, wd = F(s["beta1"]), F(s["beta2"]), F(s["eps"]), F(s["weight_decay"])
        bc1, bc2 = F(1) - b1 ** F(self.step), F(1) - b2 ** F(self.step)
        for n, p in params.items():
            g = grads[n] * clip
            self.m[n] = b1 * self.m[n] + (F(1) - b1) * g
            self.v[n] = b2 * self.v[n] + (F(1) - b2) * g * g
            decay = wd * p if p.ndim >= 2 else F(0)
            p -= lr * ((self.m[n] / bc1) / (np.sqrt(self.v[n] / bc2) + eps) + decay)
        return norm

    def save(self):
        tensors = {"m." + n: m for n, m in self.m.items()}
        tensors.update({"v." + n: v for n, v in self.v.items()})
        wt.write_safetensors(self.path, tensors)
        with open(os.path.join(os.path.dirname(self.path), "adamw.json"), "w") as f:
            json.dump({"step": self.step}, f)


def main():
    job = wt.load_job()
    if job["kind"] != "full_weights" or job["base"]["family"] != "byte-gpt":
        raise wt.JobError(f"this trainer trains full-weight rounds of the byte GPT, not a {job['kind']} job "
                          f"on a {job['base']['family']} base")
    cfg = job["base"]["config"]
    params = wt.read_safetensors(job["base"]["weights"])
    expected = names(cfg["layers"])
    if sorted(params) != sorted(expected):
        raise wt.JobError("the base's tensors are not the byte GPT's of this configuration")
    training = job["training"]
    with open(job["corpus"]["train"], "rb") as f:
        corpus = f.read()
    validation = b""
    if job["corpus"]["validation"]:
        with open(job["corpus"]["validation"], "rb") as f:
            validation = f.read()
    rows = training["batch_rows"]
    before = loss_per_byte(params, cfg, validation, rows) if len(validation) > 1 else None
    adamw = AdamW(training["adamw"], params, job["state_dir"])
    rng = wt.SplitMix64(training["seed"])
    steps = training["steps"]
    losses, tokens = [], 0
    for step in range(steps):
        inputs, targets, mask = sample(corpus, rows, cfg["context"], rng)
        loss_sum, count, grads = forward(params, cfg, inputs, targets, mask, True)
        losses.append(loss_sum / count if count > 0 else 0.0)
        tokens += int(mask.sum())
        norm = adamw.update(params, grads)
        print(f"step {step + 1}/{steps} loss {losses[-1]:.4f} grad norm {norm:.3f}", flush=True)
    after = loss_per_byte(params, cfg, validation, rows) if len(validation) > 1 else None
    wt.write_safetensors(job["output"]["weights"], params)
    adamw.save()
    tail = losses[steps - steps // 4:] or [0.0]
    wt.write_metrics(job, steps, tokens, sum(losses) / max(steps, 1), sum(tail) / len(tail), before, after)


if __name__ == "__main__":
    main()
