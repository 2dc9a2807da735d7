"""Reference figures for SmolLM2-135M-Instruct (Q4_1 GGUF) from transformers,
which dequantizes the GGUF through the `gguf` package and runs in float32.
Run on the GPU machine. Prints JSON with:
  - ppl of the first N tokens of wikitext2-test.txt in non-overlapping windows of
    ctx tokens (each window scored on its own: tokens 1..ctx-1 given the prefix),
    exactly what `kvserve ppl --ctx 1024 --max-tokens 4096` computes;
  - the token ids of that text prefix (to check kvserve's tokenizer);
  - the greedy chat answer to "What is the capital of France?" (token ids).
Usage: python3 smollm2_reference.py GGUF_DIR GGUF_NAME WIKITEXT OUT.json
"""
import json, math, sys
import torch
import transformers as tf

gdir, gname, text_path, out_path = sys.argv[1:5]
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
dev = "cuda" if torch.cuda.is_available() else "cpu"
tok = tf.AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
model = tf.AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, torch_dtype=torch.float32).to(dev).eval()

text = open(text_path, encoding="utf-8").read()
ids = tok(text, add_special_tokens=False)["input_ids"]
res = {"transformers": tf.__version__, "torch": torch.__version__, "text_tokens": len(ids)}
for ctx, n in ((1024, 4096), (512, 2048), (1024, 16384)):
    nll, cnt = 0.0, 0
    for s in range(0, n, ctx):
        w = torch.tensor([ids[s:s + ctx]], device=dev)
        with torch.no_grad():
            logits = model(w).logits[0].double()
        lp = torch.log_softmax(logits[:-1], dim=-1)
        nll -= lp.gather(1, w[0, 1:, None]).sum().item()
        cnt += w.shape[1] - 1
    res["ppl_ctx%d_n%d" % (ctx, n)] = math.exp(nll / cnt)
res["ids_first_4096"] = ids[:4096]

msgs = [{"role": "user", "content": "What is the capital of France?"}]
prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
pids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(dev)
with torch.no_grad():
    out = model.generate(pids, max_new_tokens=40, do_sample=False)
res["chat_prompt"] = prompt
res["chat_prompt_ids"] = pids[0].tolist()
res["chat_greedy_ids"] = out[0, pids.shape[1]:].tolist()
res["chat_greedy_text"] = tok.decode(out[0, pids.shape[1]:])
json.dump(res, open(out_path, "w"))
print(json.dumps({k: v for k, v in res.items() if "ids" not in k}, indent=1))
