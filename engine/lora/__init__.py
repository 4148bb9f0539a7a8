"""LoRA adapters: PEFT files -> LoraAdapter (adapter), normalized weights, slots, registry."""
