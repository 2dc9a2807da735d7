"""Writes a tiny Hugging Face Llama fixture (tests/fixtures/models/llama) as a
GGUF file with the `gguf` package from PyPI, the way llama.cpp's converter
does: Q and K rows permuted for GGUF's adjacent-pair RoPE, GPT-2-style BPE
tokenizer metadata. The same reference logits then apply to both files.

Usage: python3 tools/hf_to_gguf_fixture.py tests/fixtures/models/llama OUT.gguf [f32|f16|q8_0]
"""
import json, sys

import numpy as np
import gguf
from safetensors.numpy import load_file

src, out = sys.argv[1], sys.argv[2]
qtype = sys.argv[3] if len(sys.argv) > 3 else "f32"
cfg = json.load(open(f"{src}/config.json"))
tok = json.load(open(f"{src}/tokenizer.json"))
w = load_file(f"{src}/model.safetensors")

n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
rope = cfg.get("rope_parameters") or {"rope_theta": cfg.get("rope_theta", 10000.0)}


def permute(x, heads):
    # HF rotates halves of each head; GGUF llama rotates adjacent pairs.
    return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


wr = gguf.GGUFWriter(out, "llama")
wr.add_name("kvserve-test-llama")
wr.add_block_count(cfg["num_hidden_layers"])
wr.add_context_length(cfg["max_position_embeddings"])
wr.add_embedding_length(cfg["hidden_size"])
wr.add_feed_forward_length(cfg["intermediate_size"])
wr.add_head_count(n_head)
wr.add_head_count_kv(n_kv)
wr.add_rope_dimension_count(cfg["hidden_size"] // n_head)
wr.add_rope_freq_base(rope["rope_theta"])
wr.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
wr.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[qtype])

vocab = tok["model"]["vocab"]
tokens = [None] * len(vocab)
for t, i in vocab.items():
    tokens[i] = t
types = [gguf.TokenType.NORMAL] * len(tokens)
for a in tok["added_tokens"]:
    tokens[a["id"]] = a["content"]
    types[a["id"]] = gguf.TokenType.CONTROL
merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
wr.add_tokenizer_model("gpt2")
wr.add_tokenizer_pre("default")
wr.add_token_list(tokens)
wr.add_token_types(types)
wr.add_token_merges(merges)
wr.add_eos_token_id(vocab.get("<|endoftext|>", 0))
wr.add_add_bos_token(False)

names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
         "lm_head.weight": "output.weight"}
per_layer = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
             "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
             "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight"}
for name, x in w.items():
    x = x.astype(np.float32)
    if name in names:
        gname = names[name]
    else:
        parts = name.split(".")
        gname = "blk.%s.%s" % (parts[2], per_layer[".".join(parts[3:])])
        if name.endswith("q_proj.weight"):
            x = permute(x, n_head)
        elif name.endswith("k_proj.weight"):
            x = permute(x, n_kv)
    if x.ndim == 2 and qtype == "f16":
        wr.add_tensor(gname, x.astype(np.float16))
    elif x.ndim == 2 and qtype == "q8_0":
        q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
        wr.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        wr.add_tensor(gname, x)
wr.write_header_to_file()
wr.write_kv_data_to_file()
wr.write_tensors_to_file()
wr.close()
print(out)
