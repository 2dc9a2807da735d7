"""Builds the logits-parity fixtures with transformers itself (run on the GPU
machine, which has torch + transformers; CPU is enough).

For each architecture a tiny random-weight model is built from its transformers
config, saved with save_pretrained (safetensors), and fed fixed input ids; the
logits of every position, computed in float64 from the saved weights, are
written next to it:

  tests/fixtures/models/<name>/{config.json, model.safetensors (or shards),
      tokenizer.json, tokenizer_config.json, reference.json, logits.f32}

reference.json: {"inputs": [[ids...], ...], "n_vocab": V, "arch": ...};
logits.f32: little-endian float32, (sum of input lengths, V), rows in input order.

Usage: python3 gen_fixtures.py OUTDIR
"""
import json, os, sys

import numpy as np
import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

out_root = sys.argv[1]
torch.manual_seed(1234)
rng = np.random.default_rng(1234)

TEXT = """The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Sphinx of black quartz, judge my vow! 1234567890 - KV caches store keys and values.
Attention is all you need; low-rank projections compress the cache. 北京 café naïve émigré.
def main(): return 42  # code too\n\tindented lines and    multiple   spaces.
""" * 20


def make_tokenizer(vocab_size=320):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return tok


def randomize(model, std=0.12):
    # transformers' default init (std 0.02) gives nearly uniform logits; wider
    # weights give logits that actually test the arithmetic.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))


def save(name, model, tok, dtype=torch.float32, shard=None, seq_lens=(37, 11), tie=False):
    d = os.path.join(out_root, name)
    os.makedirs(d, exist_ok=True)
    # RoPE frequencies are buffers: .to(dtype) would round them to bf16/f16 and
    # the float64 reference would inherit that. Keep the float32 ones.
    inv_freq = {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("inv_freq")}
    model = model.to(dtype)
    kw = {"safe_serialization": True}
    if shard:
        kw["max_shard_size"] = shard
    model.save_pretrained(d, **kw)
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": None, "eos_token": "<|endoftext|>", "add_bos_token": False,
                   "chat_template": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"}, f)
    # reference in float64 from the saved (possibly rounded) weights
    ref = model.to(torch.float64).eval()
    for n, b in ref.named_buffers():
        if n in inv_freq:
            b.copy_(inv_freq[n].to(torch.float64))
    V = model.config.vocab_size
    inputs, rows = [], []
    for L in seq_lens:
        ids = rng.integers(0, V, size=L).tolist()
        inputs.append(ids)
        with torch.no_grad():
            logits = ref(torch.tensor([ids])).logits[0]
        rows.append(logits.to(torch.float32).numpy())
    np.concatenate(rows).astype("<f4").tofile(os.path.join(d, "logits.f32"))
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump({"inputs": inputs, "n_vocab": V, "arch": type(model).__name__,
                   "dtype": str(dtype), "transformers": tf.__version__, "torch": torch.__version__}, f)
    print(name, type(model).__name__, dtype, [len(x) for x in inputs], "logit std %.3f" % float(np.concatenate(rows).std()))


tok = make_tokenizer()
V = tok.get_vocab_size()
print("tokenizer vocab", V)
torch.set_default_dtype(torch.float32)

common = dict(vocab_size=V, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)

m = tf.LlamaForCausalLM(tf.LlamaConfig(**common)); randomize(m)
save("llama", m, tok)
m = tf.LlamaForCausalLM(tf.LlamaConfig(**common)); randomize(m)
save("llama-bf16", m, tok, dtype=torch.bfloat16)
cfg = dict(common, hidden_size=96, num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=True,
           rope_theta=500000.0,
           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
m = tf.LlamaForCausalLM(tf.LlamaConfig(**cfg)); randomize(m)
save("llama3-tied", m, tok, seq_lens=(120, 9))
m = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)); randomize(m)
save("qwen2", m, tok, dtype=torch.float16)
m = tf.MistralForCausalLM(tf.MistralConfig(**dict(common, sliding_window=4096))); randomize(m)
save("mistral-sharded", m, tok, shard="60KB")
m = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                     activation_function="gelu_new", layer_norm_epsilon=1e-5)); randomize(m)
save("gpt2", m, tok)
d = os.path.join(out_root, "gpt2")
tok.model.save(d)  # vocab.json + merges.txt: GPT-2's own tokenizer files
