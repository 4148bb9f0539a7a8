"""The served model: one generic MoE decoder (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE) and its loader.

    model = build_model(config, dtype, device, kernels.select_ops(device), max_loras, max_rank)
    native_layout = load_weights(model, path)          # "2d" or "3d" expert layout on disk
    for module in model.memory_modules():              # each declares memory_spec()
        module.bind_memory(tensors)                    # {"k", "v"} or its state tensors
    hidden = model(input_ids, ctx)                     # [T] -> [T, H]
    logits = model.compute_logits(hidden[last_rows])   # [B, V] float32
"""

from loramux.engine.model.decoder import MoeForCausalLM, build_model
from loramux.engine.model.loader import load_weights

__all__ = ["MoeForCausalLM", "build_model", "load_weights"]
