#!/usr/bin/env python3
"""GGUF versions of the tiny Qwen3, Llama and Qwen3-MoE (all layers MoE) fixtures
(scripts/make_tiny_models.py), written with the `gguf` package the way llama.cpp's converter
lays them out (llama q/k rows permuted for its rotary layout; Qwen3-MoE experts stacked into
[E, F, H] / [E, H, F] tensors), so the GGUF loader is checked against the same reference
logits. F32 tensors (exact copies of the bf16 weights), except in the fixtures of F16_FIXTURES,
which store their 2-D and 3-D weights as F16 like `convert_hf_to_gguf.py --outtype f16` (1-D
tensors, norms and the MoE router stay F32; bf16 -> f16 is exact but for a few tiny subnormals).
Tied embeddings: no output.weight, as llama.cpp's converter writes them. Run by hand after the
tiny models; `python scripts/make_tiny_gguf.py qwen3moe_all` writes only the named fixtures."""
import json
import pathlib
import re
import sys

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

# llama.cpp tensor names of the MoE feed-forward (gguf.constants), without the ".weight"
MOE = {t: gguf.TENSOR_NAMES[t] for t in (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_EXP,
                                          gguf.MODEL_TENSOR.FFN_UP_EXP, gguf.MODEL_TENSOR.FFN_DOWN_EXP)}
assert all(t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3MOE] for t in MOE)
EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")

F16_FIXTURES = {"qwen3moe_all"}
ROUTER = re.compile(re.escape(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_GATE_INP]).replace(r"\{bid\}", r"\d+") + r"\.weight")

only = sys.argv[1:]
for fixture in ["qwen3", "llama", "qwen3moe_all"]:
    if only and fixture not in only:
        continue
    cfg = json.loads((tiny / fixture / "config.json").read_text())
    arch = {"qwen3_moe": gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3MOE]}.get(cfg["model_type"], fixture)
    import torch
    from safetensors.torch import load_file as load_torch
    tensors = {k: v.to(torch.float32).numpy() for k, v in load_torch(str(tiny / fixture / "model.safetensors")).items()}
    if cfg.get("tie_word_embeddings"):
        assert "lm_head.weight" not in tensors  # transformers does not save the tied head
    f16 = fixture in F16_FIXTURES
    w = gguf.GGUFWriter(str(tiny / f"{fixture}.gguf"), arch)
    if f16:
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if arch == "qwen3moe":
        # llama.cpp's qwen3moe has no dense layers (and always renormalises the top-k weights)
        assert not cfg["mlp_only_layers"] and cfg["decoder_sparse_step"] == 1 and cfg["norm_topk_prob"]
        w.add_expert_count(cfg["num_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        # stack the per-expert HF matrices like convert_hf_to_gguf.py's Qwen2MoeModel:
        # gate/up [F, H] -> [E, F, H], down [H, F] -> [E, H, F] (numpy shapes)
        experts = {}
        for k in [k for k in tensors if EXPERT.fullmatch(k)]:
            layer, e, kind = EXPERT.fullmatch(k).groups()
            experts.setdefault((int(layer), kind), {})[int(e)] = tensors.pop(k)
        for (layer, kind), per in experts.items():
            assert sorted(per) == list(range(cfg["num_experts"]))
            t = {"gate": gguf.MODEL_TENSOR.FFN_GATE_EXP, "up": gguf.MODEL_TENSOR.FFN_UP_EXP,
                 "down": gguf.MODEL_TENSOR.FFN_DOWN_EXP}[kind]
            tensors[f"{MOE[t].format(bid=layer)}.weight"] = np.stack([per[e] for e in range(cfg["num_experts"])])
        for layer in range(cfg["num_hidden_layers"]):
            tensors[f"{MOE[gguf.MODEL_TENSOR.FFN_GATE_INP].format(bid=layer)}.weight"] = \
                tensors.pop(f"model.layers.{layer}.mlp.gate.weight")  # router [E, H]
        def order(k):  # embeddings, then layer by layer, then final norm and head (stable sort)
            m = re.search(r"(?:layers|blk)\.(\d+)\.", k)
            return int(m.group(1)) if m else (-1 if "embed" in k else 1 << 30)
        tensors = dict(sorted(tensors.items(), key=lambda kv: order(kv[0])))
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
        elif k.startswith("blk."):
            name = k  # already a llama.cpp name (Qwen3-MoE router and stacked experts)
        else:
            _, _, layer, rest = k.split(".", 3)
            name = f"blk.{layer}.{NAMES[rest]}"
            if arch == "llama" and rest == "self_attn.q_proj.weight":
                v = permute(v, cfg["num_attention_heads"])
            if arch == "llama" and rest == "self_attn.k_proj.weight":
                v = permute(v, cfg["num_key_value_heads"])
        # convert_hf_to_gguf.py keeps 1-D tensors, norms and ffn_gate_inp (router) in F32
        dtype = np.float16 if f16 and v.ndim >= 2 and not ROUTER.fullmatch(name) else np.float32
        w.add_tensor(name, np.ascontiguousarray(v, dtype=dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print("wrote", tiny / f"{fixture}.gguf")
