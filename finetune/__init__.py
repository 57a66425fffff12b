"""Samples and datasets, the QLoRA refresh recipe, evaluation and the gate, the refresh runner,
and the kernels only training uses.

Depends on storage/ and, for what training and serving share (the chat format, the 4-bit
quantization config, the decoder), on serving/; never on webapp/.
"""
