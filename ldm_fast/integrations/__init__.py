"""Adapters that plug ldm_fast into other libraries' models.

``ldm_fast.integrations.diffusers``: :class:`~ldm_fast.integrations.diffusers.AttnProcessor`, an
attention processor for diffusers' ``Attention`` modules (``unet.set_attn_processor(AttnProcessor())``,
or ``ldm_fast.optimize(model, attention=True)``, which swaps it in where the default processor is set).

Importing ``ldm_fast`` imports none of these libraries; each adapter imports its library only when
it needs it, so they stay optional dependencies.
"""
