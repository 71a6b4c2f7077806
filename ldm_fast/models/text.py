"""Text conditioning for the U-Net: any ``[B, L, context_dim]`` tensor; this wraps a CLIP text model you have.

ldm_fast does not rebuild a text encoder. SD v1 conditions on the last hidden state of
``openai/clip-vit-large-patch14`` (``[B, 77, 768]``, after the final layer norm, no clip-skip), with
the prompt padded to 77 tokens and the unconditional prompt ``""`` for classifier-free guidance.
Pass the ``transformers`` ``CLIPTokenizer`` and ``CLIPTextModel`` you loaded yourself (transformers
is not a dependency, and nothing here downloads weights).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["encode_prompts"]


@torch.no_grad()
def encode_prompts(prompts: Union[str, Sequence[str]], tokenizer, text_encoder, *, max_length: int = 77,
                   device: Optional[torch.device] = None) -> Tensor:
    """``[B, max_length, hidden]``: ``text_encoder(input_ids).last_hidden_state`` of the prompts,
    tokenized as SD v1 does (``padding="max_length"``, ``truncation=True``), on ``device`` (default:
    the text encoder's)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if device is None:
        device = next(text_encoder.parameters()).device
    tokens = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                       return_tensors="pt")
    return text_encoder(input_ids=tokens.input_ids.to(device)).last_hidden_state
