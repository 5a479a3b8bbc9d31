"""Zero-shot classification with a sentence encoder, the CLIP protocol for text.

A text is the L2-normalised mean of its token embeddings (padding excluded). Class c is the
normalised mean, over prompt templates, of the embeddings of ``template.format(c)`` computed by the
*pretrained* encoder and then frozen, like CLIP's text tower. Logits are ``scale * cosine``. The
zoo fine-tunes encoders through the same head, so a merged encoder is scored on what its parts
were trained for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``hidden [batch, seq, d]`` over the attended positions -> ``[batch, d]``."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def embed(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Normalised sentence embeddings ``[batch, d]`` of a BERT-style encoder."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask)[0]
    return F.normalize(mean_pool(hidden, attention_mask), dim=-1)


@torch.no_grad()
def embed_texts(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 64,
                max_length: int = 128) -> Tensor:
    """Normalised embeddings ``[len(texts), d]``, computed in batches without gradients."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt").to(device)
        out.append(embed(model, enc["input_ids"], enc["attention_mask"]))
    return torch.cat(out)


def label_prompt_head(encoder: nn.Module, tokenizer, classnames: list[str], templates: list[str]) -> Tensor:
    """Frozen class embeddings ``[num_classes, d]``: per class, the normalised mean over templates."""
    prompts = [template.format(name) for name in classnames for template in templates]
    emb = embed_texts(encoder, tokenizer, prompts).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


def prompt_logits(text_embeddings: Tensor, head: Tensor, scale: float = 20.0) -> Tensor:
    """``scale * cosine`` between normalised text and class embeddings -> ``[batch, num_classes]``."""
    return scale * text_embeddings @ head.to(text_embeddings).T
