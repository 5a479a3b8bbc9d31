"""Tiny, randomly initialised CLIP / Flan-T5 / Mistral models and their tokenizers, built offline.

Shapes are small enough that building and briefly training a whole zoo takes seconds on a CPU, but
keep the real module structure (q/k/v/out projections, gated T5 feed-forward, Mistral GQA and
gate/up/down MLP) so every code path of the algorithms runs as it would on the real models.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from fusion_bench_pave.assets.tiny_tasks import IMAGE_SIZE, text_vocabulary

HIDDEN = 32
FFN = 64
LAYERS = 2
HEADS = 4
# config fields of each architecture at these shapes (reference/tiny_models.py builds in-memory models from them)
TOWER = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
T5_SHAPE = dict(d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=LAYERS, num_decoder_layers=LAYERS,
                num_heads=HEADS, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
DECODER_SHAPE = dict(TOWER, num_key_value_heads=HEADS // 2, tie_word_embeddings=False)


def build_clip(out_dir: Path, seed: int) -> None:
    """Save a tiny ``CLIPModel`` with a character-level CLIP tokenizer and image processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + ".,":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    (out_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, **TOWER),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, **TOWER),
        projection_dim=HIDDEN,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(out_dir)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)


def word_tokenizer(words: list[str], specials: dict[str, str]):
    """A whitespace word-level fast tokenizer over ``words``.

    ``specials`` maps role (pad/eos/unk/bos) to token; they take the first ids in that order.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials.values())}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def build_t5(out_dir: Path, seed: int) -> None:
    """Save a tiny Flan-T5-style ``T5ForConditionalGeneration`` (gated-GELU FFN) with its tokenizer."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = word_tokenizer(text_vocabulary(), {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"})
    config = T5Config(vocab_size=len(tokenizer), **T5_SHAPE, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def build_mistral(out_dir: Path, seed: int) -> None:
    """Save a tiny ``MistralForCausalLM`` (grouped-query attention, gated MLP) with its tokenizer."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = word_tokenizer(
        text_vocabulary(), {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "bos_token": "<s>"}
    )
    config = MistralConfig(
        vocab_size=len(tokenizer), **DECODER_SHAPE, head_dim=HIDDEN // HEADS, max_position_embeddings=64,
        sliding_window=None, pad_token_id=0, eos_token_id=1, bos_token_id=3,
    )
    torch.manual_seed(seed)
    MistralForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
