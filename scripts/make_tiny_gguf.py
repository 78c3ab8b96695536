#!/usr/bin/env python3
"""GGUF versions of the tiny Qwen3 and Llama fixtures (scripts/make_tiny_models.py), written
with the `gguf` package the way llama.cpp's converter lays them out (llama q/k rows
permuted for its rotary layout), so the GGUF loader is checked against the same reference
logits. F32 tensors (exact copies of the bf16 weights). Run by hand after the tiny models."""
import json
import pathlib

import gguf
import numpy as np
from safetensors.numpy import load_file

root = pathlib.Path(__file__).resolve().parent.parent
tiny = root / "crates" / "model" / "tests" / "fixtures" / "tiny"


def permute(w, heads):
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

for arch in ["qwen3", "llama"]:
    cfg = json.loads((tiny / arch / "config.json").read_text())
    import torch
    from safetensors.torch import load_file as load_torch
    tensors = {k: v.to(torch.float32).numpy() for k, v in load_torch(str(tiny / arch / "model.safetensors")).items()}
    w = gguf.GGUFWriter(str(tiny / f"{arch}.gguf"), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rp = cfg["rope_parameters"]
    w.add_rope_freq_base(rp["rope_theta"])
    if rp.get("rope_type") == "llama3":
        # llama.cpp stores llama3 scaling as precomputed rope_freqs; we keep the parameters.
        w.add_string(f"{arch}.rope.scaling.type", "llama3")
        w.add_float32(f"{arch}.rope.scaling.factor", rp["factor"])
        w.add_float32(f"{arch}.rope.scaling.low_freq_factor", rp["low_freq_factor"])
        w.add_float32(f"{arch}.rope.scaling.high_freq_factor", rp["high_freq_factor"])
        w.add_uint32(f"{arch}.rope.scaling.original_context_length", rp["original_max_position_embeddings"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg["vocab_size"])])
    w.add_token_merges([])
    for k, v in tensors.items():
        if k == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif k == "model.norm.weight":
            name = "output_norm.weight"
        elif k == "lm_head.weight":
            name = "output.weight"
        else:
            _, _, layer, rest = k.split(".", 3)
            name = f"blk.{layer}.{NAMES[rest]}"
            if arch == "llama" and rest == "self_attn.q_proj.weight":
                v = permute(v, cfg["num_attention_heads"])
            if arch == "llama" and rest == "self_attn.k_proj.weight":
                v = permute(v, cfg["num_key_value_heads"])
        w.add_tensor(name, np.ascontiguousarray(v, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print("wrote", tiny / f"{arch}.gguf")
