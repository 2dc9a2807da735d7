#!/usr/bin/env python3
"""Writes a random-weight Hugging Face Llama directory of a given shape, for
end-to-end throughput runs of the cuda backend on a model whose KV reads
matter (the device machine has no network, and an 8B model does not travel:
it is made there). The weights are random (normal, std 0.02; norms 1), so the
text is noise; what it measures is time. Tokenizer files come from another
directory (any Llama-style tokenizer.json; its vocabulary may be smaller than
the model's, as kvserve allows).

    python3 tools/device/make_llama_shape.py OUT_DIR TOKENIZER_DIR [--preset llama8b]
        [--layers N] [--vocab N]

Presets: llama8b (Llama-3-8B: hidden 4096, 32 heads, 8 kv heads, head_dim 128,
ffn 14336, 32 layers, vocab 128256, rope theta 500000); smollm2 (SmolLM2-135M:
hidden 576, 9 heads, 3 kv heads, head_dim 64, ffn 1536, 30 layers, vocab 49152;
untied output); llama1b (Llama-3.2-1B: hidden 2048, 32 heads, 8 kv heads,
head_dim 64, ffn 8192, 16 layers); qwen05b (Qwen2.5-0.5B's sizes as a llama:
hidden 896, 14 heads, 2 kv heads, head_dim 64, ffn 4864, 24 layers, vocab
151936; no q/k/v biases); tiny (the same head
geometry in 2 layers of hidden 512, for a check on a laptop). Uses torch (on
the GPU when there is one) if it is installed, else numpy. The safetensors
file is written directly (8-byte header length, JSON header, data), F16.
"""
import argparse
import json
import os
import shutil
import struct
import sys

PRESETS = {
    "llama8b": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, layers=32, vocab=128256),
    "smollm2": dict(hidden=576, heads=9, kv_heads=3, head_dim=64, ffn=1536, layers=30, vocab=49152),
    "llama1b": dict(hidden=2048, heads=32, kv_heads=8, head_dim=64, ffn=8192, layers=16, vocab=128256),
    "qwen05b": dict(hidden=896, heads=14, kv_heads=2, head_dim=64, ffn=4864, layers=24, vocab=151936),
    "tiny": dict(hidden=512, heads=4, kv_heads=1, head_dim=128, ffn=1024, layers=2, vocab=1024),
}


def tensors(c):
    """(name, shape, kind) in file order; kind 'w' random, 'n' ones."""
    E, F, D = c["hidden"], c["ffn"], c["head_dim"]
    yield "model.embed_tokens.weight", (c["vocab"], E), "w"
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (E,), "n"
        yield p + "self_attn.q_proj.weight", (c["heads"] * D, E), "w"
        yield p + "self_attn.k_proj.weight", (c["kv_heads"] * D, E), "w"
        yield p + "self_attn.v_proj.weight", (c["kv_heads"] * D, E), "w"
        yield p + "self_attn.o_proj.weight", (E, c["heads"] * D), "w"
        yield p + "post_attention_layernorm.weight", (E,), "n"
        yield p + "mlp.gate_proj.weight", (F, E), "w"
        yield p + "mlp.up_proj.weight", (F, E), "w"
        yield p + "mlp.down_proj.weight", (E, F), "w"
    yield "model.norm.weight", (E,), "n"
    yield "lm_head.weight", (c["vocab"], E), "w"


def numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def make_source():
    """Returns f(shape, kind, seed) -> bytes of F16 numbers."""
    try:
        import torch
        dev = "cuda" if torch.cuda.is_available() else "cpu"

        def f(shape, kind, seed):
            if kind == "n":
                return torch.ones(shape, dtype=torch.float16).numpy().tobytes()
            g = torch.Generator(device=dev).manual_seed(seed)
            t = torch.empty(shape, dtype=torch.float16, device=dev).normal_(0.0, 0.02, generator=g)
            return t.cpu().numpy().tobytes()
        return f, "torch on " + dev
    except ImportError:
        import numpy as np

        def f(shape, kind, seed):
            if kind == "n":
                return np.ones(shape, dtype=np.float16).tobytes()
            rng = np.random.default_rng(seed)
            return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16).tobytes()
        return f, "numpy"


def positive(text):
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of at least 1 is needed")
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("tokenizer_dir")
    ap.add_argument("--preset", default="llama8b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=positive)
    ap.add_argument("--vocab", type=positive)
    a = ap.parse_args()
    c = dict(PRESETS[a.preset])
    if a.layers:
        c["layers"] = a.layers
    if a.vocab:
        c["vocab"] = a.vocab
    os.makedirs(a.out, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        src = os.path.join(a.tokenizer_dir, name)
        if not os.path.exists(src):
            sys.exit(f"make_llama_shape: {src}: missing (the tokenizer directory needs {name})")
        shutil.copy(src, os.path.join(a.out, name))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": c["hidden"], "intermediate_size": c["ffn"],
        "num_attention_heads": c["heads"], "num_key_value_heads": c["kv_heads"], "head_dim": c["head_dim"],
        "num_hidden_layers": c["layers"], "vocab_size": c["vocab"],
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float16",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    with open(os.path.join(a.out, "config.json"), "w") as fp:
        json.dump(config, fp, indent=1)

    header, off = {}, 0
    for name, shape, _ in tensors(c):
        n = numel(shape) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    src, how = make_source()
    path = os.path.join(a.out, "model.safetensors")
    with open(path, "wb") as fp:
        fp.write(struct.pack("<Q", len(hj)))
        fp.write(hj)
        for seed, (name, shape, kind) in enumerate(tensors(c)):
            fp.write(src(shape, kind, seed + 1))
    print(f"{a.out}: {c['layers']} layers, hidden {c['hidden']}, {c['heads']}/{c['kv_heads']} heads of "
          f"{c['head_dim']}, ffn {c['ffn']}, vocab {c['vocab']}: {off / 1e9:.2f} GB of F16 ({how})")


if __name__ == "__main__":
    main()
