"""The PyTorch baseline for the Llama benchmark: a plain-torch Llama (as Hugging Face's
LlamaForCausalLM computes it: RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU, tied
head) on the weights `weft model import` wrote, timed on the same token ids as
crates/weft-llama/examples/llama_bench.rs. Prints one JSON object.

usage: llama_torch.py MODEL_DIR TOKENS_JSON BATCH CONTEXT REPEATS THREADS
"""
import json
import pathlib
import resource
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


def read_safetensors(path):
    """Every tensor of an f32 safetensors file (numpy only: no `safetensors` package needed)."""
    raw = pathlib.Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] != "F32":
            raise SystemExit(f"{path}: {name} is {meta['dtype']}, expected F32")
        start, end = meta["data_offsets"]
        out[name] = torch.from_numpy(np.frombuffer(raw, dtype=np.float32, count=(end - start) // 4,
                                                   offset=base + start).reshape(meta["shape"]).copy())
    return out


class Llama:
    def __init__(self, weights, config, rank=8, alpha=16.0):
        self.w = weights
        self.c = config
        self.layers = config["num_hidden_layers"]
        self.heads = config["num_attention_heads"]
        self.kv_heads = config["num_key_value_heads"]
        self.head_dim = config["hidden_size"] // self.heads
        self.eps = config["rms_norm_eps"]
        self.scale = alpha / rank
        self.lora = {}
        gen = torch.Generator().manual_seed(1)
        for i in range(self.layers):
            for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                out_dim, in_dim = weights[f"model.layers.{i}.{module}.weight"].shape
                a = torch.linalg.qr(torch.randn(in_dim, rank, generator=gen))[0].T.contiguous()  # orthonormal rows
                b = torch.zeros(out_dim, rank, requires_grad=True)
                self.lora[f"{i}.{module}"] = (a, b)

    def rope(self, t):
        d = self.head_dim
        inv = 1.0 / (self.c["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        freqs = torch.outer(torch.arange(t, dtype=torch.float32), inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def norm(self, x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def linear(self, x, i, module, adapted):
        y = x @ self.w[f"model.layers.{i}.{module}.weight"].T
        if adapted:
            a, b = self.lora[f"{i}.{module}"]
            y = y + self.scale * ((x @ a.T) @ b.T)
        return y

    def forward(self, idx, adapted):
        bsz, t = idx.shape
        cos, sin = self.rope(t)
        rot = lambda x: torch.cat([-x[..., self.head_dim // 2:], x[..., :self.head_dim // 2]], dim=-1)
        x = self.w["model.embed_tokens.weight"][idx]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            h = self.norm(x, self.w[p + "input_layernorm.weight"])
            q = self.linear(h, i, "self_attn.q_proj", adapted).view(bsz, t, self.heads, self.head_dim).transpose(1, 2)
            k = self.linear(h, i, "self_attn.k_proj", adapted).view(bsz, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = self.linear(h, i, "self_attn.v_proj", adapted).view(bsz, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
            group = self.heads // self.kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(bsz, t, -1)
            x = x + self.linear(y, i, "self_attn.o_proj", adapted)
            h = self.norm(x, self.w[p + "post_attention_layernorm.weight"])
            m = F.silu(self.linear(h, i, "mlp.gate_proj", adapted)) * self.linear(h, i, "mlp.up_proj", adapted)
            x = x + self.linear(m, i, "mlp.down_proj", adapted)
        x = self.norm(x, self.w["model.norm.weight"])
        head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        return x @ head.T

    def loss(self, idx, adapted):
        logits = self.forward(idx, adapted)
        v = logits.shape[-1]
        return F.cross_entropy(logits[:, :-1].reshape(-1, v), idx[:, 1:].reshape(-1))


def main():
    model_dir, tokens_path = pathlib.Path(sys.argv[1]), sys.argv[2]
    batch, context, repeats, threads = (int(x) for x in sys.argv[3:7])
    torch.set_num_threads(threads)
    config = json.loads((model_dir / "config.json").read_text())
    started = time.perf_counter()
    weights = read_safetensors(model_dir / "model.safetensors")
    load_seconds = time.perf_counter() - started
    model = Llama(weights, config)
    ids = torch.tensor(json.loads(pathlib.Path(tokens_path).read_text()), dtype=torch.long).view(batch, context)

    forward = []
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            loss = model.loss(ids, adapted=False).item()
            forward.append(time.perf_counter() - t)

    params = [b for (_, b) in model.lora.values()]
    opt = torch.optim.AdamW(params, lr=5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    train = []
    first_step_loss = None
    for repeat in range(repeats + 1):
        t = time.perf_counter()
        step_loss = model.loss(ids, adapted=True)
        opt.zero_grad(set_to_none=True)
        step_loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if repeat == 0:
            first_step_loss = step_loss.item()  # the warm-up step is not timed
        else:
            train.append(time.perf_counter() - t)

    tokens = batch * context
    print(json.dumps({
        "threads": threads, "batch": batch, "context": context, "torch": torch.__version__,
        "load_seconds": load_seconds,
        "forward_seconds": forward, "forward_tokens_per_s": tokens / statistics.median(forward),
        "train_seconds": train, "train_tokens_per_s": tokens / statistics.median(train),
        "mean_nll": loss, "first_step_loss": first_step_loss,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    main()
