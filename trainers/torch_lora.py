"""A weft trainer in PyTorch + Hugging Face transformers: LoRA adapter rounds on a Llama base
(SmolLM2-135M and any other checkpoint weft imports).

Per round the node's job gives the frozen base (Hugging Face's names and config.json), its
tokenizer.json, the round's initial LoRA factors and the training settings. This trainer builds
`transformers.LlamaForCausalLM` from them, adds `(alpha / rank) * B @ A` to each adapted
projection, trains B (and A on the `full` track) with AdamW on windows of the node's text, and
writes every factor back. It follows weft's built-in adapter trainer: windows drawn with weft's
SplitMix64 from the job's seed, the mean next-token loss over each step's windows, AdamW with
the job's settings and fresh moments each round, global-norm clipping.

Install (CPU or GPU torch; the versions weft was checked with):
    trainers/setup --torch                       # into trainers/.venv
    # or: pip install torch==2.15.0 transformers==5.25.0
Join with it:
    weft node join KIT --trainer "trainers/.venv/bin/python trainers/torch_lora.py"
WEFT_TORCH_DEVICE=cuda runs it on a GPU (default: cpu).
"""

import contextlib
import math
import os
import sys

import torch
import transformers
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import weft_trainer as wt  # noqa: E402


def no_init_weights():
    """Skips the random initialisation the weights are about to replace (half of building
    SmolLM2 here); a transformers without the helper initialises as usual."""
    for where in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return __import__(where, fromlist=["no_init_weights"]).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def load_base(job, device):
    config = transformers.LlamaConfig(**job["base"]["config"])
    with no_init_weights():
        model = transformers.LlamaForCausalLM(config)
    state = load_file(job["base"]["weights"])
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise wt.JobError(f"the base does not fit {config.architectures}: missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}")
    model.load_state_dict(state)
    model.to(device=device, dtype=torch.float32)
    model.requires_grad_(False)
    model.eval()
    return model


def attach(model, factors, scale, train_a):
    """Adds scale * B @ A to every module named by the factors; returns the trainable tensors."""
    modules = dict(model.named_modules())
    trainable = []
    for name in sorted(factors):
        if not name.endswith(".lora_A.weight"):
            continue
        module_name = name[: -len(".lora_A.weight")]
        a, b = factors[name], factors[module_name + ".lora_B.weight"]
        module = modules.get(module_name)
        if module is None:
            raise wt.JobError(f"the adapter names {module_name}, which the model does not have")
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
            raise wt.JobError(f"{module_name}: factors {tuple(a.shape)}, {tuple(b.shape)} do not fit the layer")
        a.requires_grad_(train_a)
        b.requires_grad_(True)
        trainable += [a, b] if train_a else [b]
        module.register_forward_hook(lambda _m, args, out, a=a, b=b: out + scale * ((args[0] @ a.T) @ b.T))
    return trainable


def main():
    job = wt.load_job()
    if job["kind"] != "adapter" or job["base"]["family"] != "llama":
        raise wt.JobError(f"this trainer trains adapter rounds on a llama base, not a {job['kind']} job on a "
                          f"{job['base']['family']} base")
    torch.manual_seed(job["training"]["seed"] & 0x7FFFFFFF)
    device = torch.device(os.environ.get("WEFT_TORCH_DEVICE", "cpu"))
    adapter, training = job["adapter"], job["training"]
    model = load_base(job, device)
    factors = {n: t.to(device=device, dtype=torch.float32).clone() for n, t in load_file(adapter["initial"]).items()}
    train_a = adapter["track"] == "full"
    trainable = attach(model, factors, adapter["alpha"] / adapter["rank"], train_a)

    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(job["base"]["tokenizer"])
    with open(job["corpus"]["train"], encoding="utf-8") as f:
        tokens = tokenizer.encode(f.read(), add_special_tokens=False).ids
    rows, context = training["batch_rows"], training["context"]
    if len(tokens) < 2 or context < 2:
        raise wt.JobError(f"the node's text has {len(tokens)} tokens: too few to train on")
    window = min(context, len(tokens))
    corpus = torch.tensor(tokens, dtype=torch.long, device=device)

    s = training["adamw"]
    optimizer = torch.optim.AdamW(trainable, lr=s["lr"], betas=(s["beta1"], s["beta2"]), eps=s["eps"],
                                  weight_decay=s["weight_decay"])
    rng = wt.SplitMix64(training["seed"])
    steps = training["steps"]
    losses = []
    for step in range(steps):
        starts = [rng.below(len(tokens) - window + 1) for _ in range(rows)]
        batch = torch.stack([corpus[start:start + window] for start in starts])
        logits = model(input_ids=batch).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if s["clip_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(trainable, s["clip_norm"])
        optimizer.step()
        losses.append(loss.item())
        print(f"step {step + 1}/{steps} loss {losses[-1]:.4f}", flush=True)
        if not math.isfinite(losses[-1]):
            raise wt.JobError(f"the loss is {losses[-1]} at step {step + 1}")
    wt.write_safetensors(job["output"]["weights"], {n: t.detach().cpu().numpy() for n, t in factors.items()})
    tail = losses[steps - steps // 4:] or losses[-1:] or [0.0]
    wt.write_metrics(job, steps, steps * rows * (window - 1), sum(losses) / max(steps, 1), sum(tail) / len(tail))


if __name__ == "__main__":
    main()
