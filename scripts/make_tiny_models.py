#!/usr/bin/env python3
"""Tiny random Qwen3 and Llama models made with Hugging Face transformers, saved as
safetensors (bf16) with their config.json, plus reference logits at every position and
16-token greedy continuations (full forward, float32) for fixed prompts, into
crates/model/tests/fixtures/tiny/. Run once by hand (`pip install torch transformers`);
the outputs are committed (about 2 MB)."""
import json
import pathlib

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

root = pathlib.Path(__file__).resolve().parent.parent
out = root / "crates" / "model" / "tests" / "fixtures" / "tiny"
PROMPTS = [[1, 17, 300, 1999, 42, 7, 7, 512], [1000, 3, 4, 5], [9, 88, 777, 1500, 20, 21, 22, 23, 24, 25, 26, 27]]
N = 16

common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, vocab_size=2048, max_position_embeddings=512,
              rms_norm_eps=1e-6, tie_word_embeddings=False)
qwen2 = dict(common, hidden_size=256)  # Qwen2 derives head_dim = hidden / heads = 64
qwen2.pop("head_dim")
models = {
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(rope_theta=1e6, **qwen2)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(rope_theta=1e6, **common)),
    "llama": (LlamaForCausalLM, LlamaConfig(rope_theta=5e5, rope_scaling={"rope_type": "llama3", "factor": 8.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, **common)),
}
import sys
only = sys.argv[1:]
for name, (cls, cfg) in models.items():
    if only and name not in only:
        continue
    torch.manual_seed(0)
    model = cls(cfg)
    with torch.no_grad():  # larger than the default init so the model is far from uniform
        for pname, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif p.dim() == 1 and "bias" in pname:
                p.normal_(0, 0.5)  # biases (Qwen2's q/k/v): not left at zero
    d = out / name
    model.to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
    ref = cls.from_pretrained(d, dtype=torch.float32).eval()
    cases = []
    for ids in PROMPTS:
        with torch.no_grad():
            logits = ref(torch.tensor([ids])).logits[0]
            cont = []
            for _ in range(N):
                cont.append(int(ref(torch.tensor([ids + cont])).logits[0, -1].argmax()))
        cases.append({"prompt_ids": ids, "logits": [[round(float(x), 5) for x in row] for row in logits[:, :64]],
                      "greedy_ids": cont})
    (d / "reference.json").write_text(json.dumps({"note": "logits: first 64 vocab entries per position, float32 from the bf16 weights",
                                                  "cases": cases}))
    print(name, [c["greedy_ids"][:6] for c in cases])
