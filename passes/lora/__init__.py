"""The LoRA linear pass: what it matches (`lora_site`), its checks (autocast, DTensor operands,
adapter groups), the frozen-base strategies it hands a site to (`fp8_linear`, `sparse24_linear`),
and the report of LoRA layers it left (`lora_leftovers`). The pass itself is `lora_linear`."""
