"""Classify text with a language model by comparing the logits of one label word per class.

Works for encoder-decoder models (first decoder step) and causal LMs (position of the last real
token). The same scoring is used to fine-tune the tiny zoo and to evaluate merged models, so a
model's accuracy measures exactly what it was trained for.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def label_token_ids(tokenizer, label_words: list[str]) -> list[int]:
    """Token id of each label word; each word must be exactly one known token."""
    ids = []
    for word in label_words:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1 or tokens[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"label word {word!r} must be a single known token of the tokenizer, got ids {tokens}"
            )
        ids.append(tokens[0])
    return ids


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last attended position per row; correct for left and right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask * positions).argmax(dim=1)


def label_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, label_ids: list[int]) -> Tensor:
    """Logits ``[batch, num_labels]`` of the label words at the model's answer position."""
    if model.config.is_encoder_decoder:
        start = torch.full(
            (input_ids.shape[0], 1), model.config.decoder_start_token_id, device=input_ids.device
        )
        logits = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=start).logits[:, 0]
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        rows = torch.arange(logits.shape[0], device=logits.device)
        logits = logits[rows, last_token_index(attention_mask)]
    return logits[:, label_ids]
