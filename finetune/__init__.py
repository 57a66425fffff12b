"""Dataset building, the QLoRA refresh recipe, evaluation and adapter promotion.

Depends on storage/, never on webapp/.
"""
