"""The model runtime the app serves with: chat formatting shared with training, the batching
decoder, guided decoding, the 4-bit kernels used at serving time, and the NF4 quantization config.

Imports neither webapp/ nor finetune/.
"""
