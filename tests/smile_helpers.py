"""Tiny in-process models and "fine-tuned" copies for the SMILE tests (no files, no hub)."""

from __future__ import annotations

import copy
import re

import torch
from torch import nn


def tiny_clip_vision(seed: int = 0) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    return CLIPVisionModel(config).eval()


def tiny_t5(seed: int = 0) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(config).eval()


def tiny_causal_lm(kind: str = "mistral", seed: int = 0, layers: int = 3) -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    return MistralForCausalLM(MistralConfig(**common)).eval()


@torch.no_grad()
def finetuned_copies(model: nn.Module, n: int, scale: float = 0.05, only: str = r".*", skip: str = r"(?!)", seed: int = 1) -> list[nn.Module]:
    """``n`` deep copies of ``model`` with Gaussian noise added to the parameters whose names match ``only`` and not ``skip``."""
    gen = torch.Generator().manual_seed(seed)
    copies = []
    for _ in range(n):
        m = copy.deepcopy(model)
        for name, p in m.named_parameters():
            if re.search(only, name) and not re.search(skip, name):
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        copies.append(m)
    return copies
