"""Bytes saved for backward by one forward of a tiny PEFT Llama (bf16 base, fp32 adapters as PEFT
keeps them, lora_dropout=0.1, LoRA on every linear): PEFT eager vs backend="unsloth".

    python scripts/measure_saved_bytes.py          # CPU, seconds; results in docs/bench/dropout-memory.md

Counts each storage once (what autograd keeps alive between forward and backward).
"""
import peft
import torch
import transformers

import unsloth_compile

print("unsloth_compile from", unsloth_compile.__file__)
torch.manual_seed(0)
cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=128)
model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"))
ids = torch.randint(0, 128, (4, 256))


def saved_bytes(fn):
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


model.train()
eager, _ = saved_bytes(lambda: model(input_ids=ids).logits)
c = torch.compile(model, backend="unsloth", options={"inner": "aot_eager"})
c(input_ids=ids).logits.sum().backward()
comp, _ = saved_bytes(lambda: c(input_ids=ids).logits)
print(f"saved for backward: PEFT eager {eager/2**20:.2f} MiB, backend=unsloth (aot_eager) {comp/2**20:.2f} MiB")
