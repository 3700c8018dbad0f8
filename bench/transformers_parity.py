"""SmolLM2 in Hugging Face transformers against weft's own forward pass, on the same weights.

Two uses:
  transformers_parity.py compare MODEL_DIR TOKENS.json WEFT_LOGITS.f32
      weft's logits (written by `cargo run --release -p weft-llama --example llama_logits`) against
      transformers' on the same tokens: prints JSON with the max absolute logit difference and both
      mean NLLs (bench/run).
  transformers_parity.py fixture MODEL_DIR OUT.json TEXT_FILE...
      writes the committed fixture crates/weft-llama/tests/fixtures/transformers_smollm2.json:
      per text, transformers' token ids (its own tokenizer), the NLL of every position and the
      logits at a few positions over a strided sample of the vocabulary plus that position's top
      five; the Rust test compares weft against it without torch.
MODEL_DIR is a directory written by `weft model import` (model.safetensors, config.json,
tokenizer.json). Runs in bench/.venv (numpy, torch, transformers).
"""

import json
import sys

import numpy as np
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer

TOKENS_PER_TEXT = 96
VOCAB_STRIDE = 61


def load(model_dir):
    config = transformers.LlamaConfig.from_json_file(f"{model_dir}/config.json")
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    state = load_file(f"{model_dir}/model.safetensors")
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state)
    model.eval()
    return model


@torch.no_grad()
def logits_of(model, ids):
    return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def nll(logits, ids):
    shifted = logits[:-1].astype(np.float64)
    shifted -= shifted.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -logp[np.arange(len(ids) - 1), ids[1:]]


def compare(model_dir, tokens_path, weft_path):
    with open(tokens_path) as f:
        ids = json.load(f)
    torch.set_num_threads(1)
    ours = logits_of(load(model_dir), ids)
    weft = np.fromfile(weft_path, dtype="<f4").reshape(ours.shape)
    print(json.dumps({
        "tokens": len(ids),
        "max_abs_logit_diff": float(np.abs(ours - weft).max()),
        "logit_scale": float(np.abs(ours).max()),
        "mean_nll_transformers": float(nll(ours, ids).mean()),
        "mean_nll_weft": float(nll(weft, ids).mean()),
    }))


def fixture(model_dir, out, texts):
    model = load(model_dir)
    tokenizer = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    cases = []
    for path in texts:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        ids = tokenizer.encode(text, add_special_tokens=False).ids[:TOKENS_PER_TEXT]
        # The text the ids stand for, so that the Rust side tokenizes exactly it.
        text = tokenizer.decode(ids)
        assert tokenizer.encode(text, add_special_tokens=False).ids == ids, path
        logits = logits_of(model, ids)
        positions = [0, len(ids) // 2, len(ids) - 1]
        sampled = []
        for p in positions:
            vocab = sorted(set(range(0, logits.shape[1], VOCAB_STRIDE)) | set(np.argsort(-logits[p])[:5].tolist()))
            sampled.append({"position": p, "vocab": vocab, "logits": [float(logits[p, v]) for v in vocab]})
        cases.append({"source": path.split("/")[-1], "text": text, "ids": ids,
                      "nll": [float(x) for x in nll(logits, ids)], "sampled": sampled})
    with open(out, "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__, "cases": cases}, f)


if __name__ == "__main__":
    if sys.argv[1] == "compare":
        compare(*sys.argv[2:5])
    elif sys.argv[1] == "fixture":
        fixture(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.exit(__doc__)
