"""Random models built in memory (no files, no hub) and perturbed "fine-tuned" copies of them.

Defaults are tiny shapes (those of the tiny zoos, fusion_bench_pave.assets.tiny_models); any config
field can be overridden, so the benchmarks build ViT-B/32 or Mistral-7B widths with the same
factories. Each factory seeds torch's global RNG with ``seed`` right before constructing the model,
which is where transformers draws the initial weights, and returns it in eval mode.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from fusion_bench_pave.assets.tiny_models import DECODER_SHAPE, T5_SHAPE, TOWER, word_tokenizer
from fusion_bench_pave.assets.tiny_tasks import IMAGE_SIZE

CLIP_VISION = dict(TOWER, num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8)
T5 = dict(T5_SHAPE, vocab_size=50, decoder_start_token_id=0, pad_token_id=0)
DECODER = dict(DECODER_SHAPE, vocab_size=64)
# what the tiny decoder shape needs beyond DECODER per family: Gemma2 narrower than its default 256-wide
# heads and 4096 sliding window, tied like its checkpoints; Phi3 without its pad id 32000 (outside the vocabulary)
DECODER_KINDS = {
    "gemma2": dict(head_dim=DECODER["hidden_size"] // DECODER["num_attention_heads"], query_pre_attn_scalar=8, sliding_window=4,
                   pad_token_id=0, tie_word_embeddings=True),
    "phi3": dict(pad_token_id=0, eos_token_id=1),
}
BERT = dict(TOWER, num_attention_heads=2, vocab_size=64, max_position_embeddings=64)
GPT2 = dict(n_embd=TOWER["hidden_size"], n_layer=TOWER["num_hidden_layers"], n_head=2, n_positions=64, vocab_size=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=1)
WORDS = [f"w{i}" for i in range(40)]


def clip_vision(seed: int = 0, **config) -> nn.Module:
    """A ``CLIPVisionModel``, 32x32 images in 8x8 patches by default."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(**{**CLIP_VISION, **config})).eval()


def open_clip_encoder(seed: int = 0) -> nn.Module:
    """FusionBench's open_clip ``ImageEncoder`` around a 2-block ViT (width 32, 32x32 images in 8x8
    patches, 16-dim embedding), built as ``ImageEncoder("ViT-B-32")`` builds its own (text transformer
    dropped) but without a download: what the task-vectors checkpoints pickle whole."""
    import open_clip

    from fusion_bench.models.open_clip import ImageEncoder

    torch.manual_seed(seed)
    clip = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=IMAGE_SIZE, patch_size=8, width=32, layers=2, head_width=16, mlp_ratio=2.0),
        text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
    )
    del clip.transformer
    encoder = ImageEncoder.__new__(ImageEncoder)
    nn.Module.__init__(encoder)
    encoder.model = clip.eval()
    encoder.train_preprocess = open_clip.image_transform(IMAGE_SIZE, is_train=True)
    encoder.val_preprocess = open_clip.image_transform(IMAGE_SIZE, is_train=False)
    return encoder


def t5(seed: int = 0, **config) -> nn.Module:
    """A Flan-T5-style ``T5ForConditionalGeneration`` (gated-GELU feed-forward) by default."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(**{**T5, **config})).eval()


def decoder(kind: str = "mistral", seed: int = 0, lm_head: bool = True, **config) -> nn.Module:
    """A Mistral, Llama, Qwen2, Gemma2 or Phi3 decoder (grouped-query attention, gated MLP; Phi3's
    fused qkv_proj / gate_up_proj): ``*ForCausalLM``, or the bare ``*Model`` without ``lm_head``.
    Input and output embeddings are untied unless ``tie_word_embeddings=True``."""
    import transformers

    name = {"mistral": "Mistral", "llama": "Llama", "qwen2": "Qwen2", "gemma2": "Gemma2", "phi3": "Phi3"}[kind]
    cls = getattr(transformers, f"{name}ForCausalLM" if lm_head else f"{name}Model")
    torch.manual_seed(seed)
    return cls(getattr(transformers, f"{name}Config")(**{**DECODER, **DECODER_KINDS.get(kind, {}), **config})).eval()


def bert(seed: int = 0, pooler: bool = True, **config) -> nn.Module:
    """A ``BertModel`` (with its CLS pooler unless ``pooler=False``)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(**{**BERT, **config}), add_pooling_layer=pooler).eval()


ENCODERS = {  # kind -> (transformers class prefix, config fields beyond BERT)
    "bert": ("Bert", {}),
    "roberta": ("Roberta", {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}),
    # DeBERTa-v3's attention: relative positions in buckets, query/key projections shared with them
    "deberta-v2": ("DebertaV2", {"relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_buckets": 8,
                                 "max_relative_positions": 16, "share_att_key": True, "norm_rel_ebd": "layer_norm",
                                 "position_biased_input": False, "pooler_hidden_size": TOWER["hidden_size"]}),
}


def encoder(kind: str = "bert", seed: int = 0, num_labels: int | None = None, **config) -> nn.Module:
    """A BERT, RoBERTa or DeBERTa-v2 encoder (``kind``): the bare ``*Model`` (BERT with its pooler), or
    ``*ForSequenceClassification`` with ``num_labels`` outputs (1: regression)."""
    import transformers

    prefix, fields = ENCODERS[kind]
    settings = {**BERT, **fields, **config}
    if num_labels is not None:
        settings["num_labels"] = num_labels
    cls = getattr(transformers, f"{prefix}Model" if num_labels is None else f"{prefix}ForSequenceClassification")
    torch.manual_seed(seed)
    return cls(getattr(transformers, f"{prefix}Config")(**settings)).eval()


def gpt2(seed: int = 0, classifier: bool = False, **config) -> nn.Module:
    """A GPT-2 (transformers ``Conv1D`` layers, weight [in, out]): ``GPT2LMHeadModel`` (lm_head tied to
    the token embedding) or, with ``classifier``, ``GPT2ForSequenceClassification`` (3 labels)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    cls = GPT2ForSequenceClassification if classifier else GPT2LMHeadModel
    return cls(GPT2Config(**{**GPT2, "num_labels": 3, **config})).eval()


def tokenizer(words: list[str] = WORDS):
    """A word-level fast tokenizer: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then ``words``."""
    return word_tokenizer(words, {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"})


@torch.no_grad()
def perturbed(model: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """A "fine-tuned" copy: every parameter plus seeded Gaussian noise of ``scale`` times its std."""
    clone = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    for p in clone.parameters():
        noise = torch.randn(p.shape, generator=generator) * scale * (p.std() if p.numel() > 1 else 1)
        p.add_(noise.to(p.dtype))
    return clone


@torch.no_grad()
def noisy_copies(model: nn.Module, n: int, scale: float = 0.05, only: str = r".*", skip: str = r"(?!)",
                 seed: int = 1) -> list[nn.Module]:
    """``n`` "fine-tuned" copies: Gaussian noise of standard deviation ``scale`` (one generator for
    all copies) added to the parameters whose names match ``only`` and not ``skip``."""
    generator = torch.Generator().manual_seed(seed)
    copies = []
    for _ in range(n):
        clone = copy.deepcopy(model)
        for name, p in clone.named_parameters():
            if re.search(only, name) and not re.search(skip, name):
                p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        copies.append(clone)
    return copies
