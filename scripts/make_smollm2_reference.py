#!/usr/bin/env python3
"""Reference greedy continuations of SmolLM2-135M-Instruct (the same Q4_1 GGUF our tests
load, dequantized by transformers to float32) for a few chat prompts, written to
crates/model/tests/fixtures/smollm2_greedy.json. Needs `pip install torch transformers gguf`
(about 3 GB: run it once by hand, not in CI) and scripts/fetch-assets.sh first."""
import json
import pathlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

root = pathlib.Path(__file__).resolve().parent.parent
models = root / ".cache" / "models"
name = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain gravity in one sentence.",
    "Translate 'good morning' into Spanish.",
]
N = 16

tok = AutoTokenizer.from_pretrained(models, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(models, gguf_file=name, dtype=torch.float32)
model.eval()
cases = []
for p in PROMPTS:
    text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # Greedy by full forward passes (no KV cache): transformers' generate() with its cache
    # picked a different token than its own full forward at a 0.13-logit margin.
    cont = []
    with torch.no_grad():
        for _ in range(N):
            logits = model(torch.tensor([ids + cont])).logits[0, -1]
            cont.append(int(logits.argmax()))
    cases.append({"prompt": p, "text": text, "prompt_ids": ids, "greedy_ids": cont,
                  "greedy_text": tok.decode(cont)})
    print(p, "=>", repr(tok.decode(cont)))
dest = root / "crates" / "model" / "tests" / "fixtures" / "smollm2_greedy.json"
dest.write_text(json.dumps({"model": name, "transformers": __import__("transformers").__version__,
                            "torch": torch.__version__, "dtype": "float32", "cases": cases}, indent=1))
print("wrote", dest)
