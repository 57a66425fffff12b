"""The 4-bit quantization every 4-bit load of hangjia uses: serving, the refresh recipe, the
benchmarks and the tests build it here, so they load the same model."""

from __future__ import annotations


def nf4_config(compute_dtype=None):
    """bitsandbytes NF4 with double quantization and bf16 compute (the QLoRA paper's recipe);
    `compute_dtype` (a torch dtype) replaces bf16, except fp32, which 4-bit products do not take
    (bf16 then)."""
    import torch
    from transformers import BitsAndBytesConfig

    if compute_dtype is None or compute_dtype == torch.float32:
        compute_dtype = torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)
