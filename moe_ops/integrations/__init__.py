"""Drop-in integrations of moe_ops into other libraries (imported on demand).

* :mod:`moe_ops.integrations.transformers` -- Hugging Face transformers 5.x: an experts
  implementation named ``"moe_ops"`` and :func:`~moe_ops.integrations.transformers.apply_moe_ops`.
"""
