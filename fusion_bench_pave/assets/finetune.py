"""The two fine-tuning loops of the zoos, tiny and real, both seeded.

``train_through_head`` (every zoo but the GLUE-protocol one) trains as the CLIP task-arithmetic
checkpoints were: cross-entropy of a task head's logits, the head itself frozen (zero-shot class
embeddings of the pretrained text tower, label-prompt embeddings, label-word rows of the LM head), so
the task vector lives in the trained body alone. Each step draws ``batch_size`` example indices with
replacement from a ``torch.Generator`` seeded with ``seed``. A zoo's recipe chooses the trained
parameters, the head, the optimizer and the numbers.

``train_epochs`` (the GLUE-protocol zoo) fine-tunes every parameter, a fresh task head included, as
GLUE checkpoints are trained: whole epochs over seeded permutations, AdamW with weight decay, linear
warmup then linear decay.
"""

from __future__ import annotations

from typing import Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

Optimizer = Literal["adam", "adamw"]


def _optimizer(name: Optimizer, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return torch.optim.Adam(params, lr=lr)


def train_through_head(module: nn.Module, params: Iterable[nn.Parameter], logits: Callable[[Tensor], Tensor],
                       labels: Tensor, steps: int, lr: float, seed: int, batch_size: int,
                       optimizer: Optimizer = "adam", desc: str | None = None) -> nn.Module:
    """Train ``params`` in place for ``steps`` steps on ``cross_entropy(logits(idx), labels[idx])``
    over seeded batches of example indices ``idx``; ``module`` is in train mode while it trains and
    in eval mode after. ``desc`` shows a progress bar."""
    opt = _optimizer(optimizer, params, lr)
    generator = torch.Generator().manual_seed(seed)
    module.train()
    for _ in tqdm(range(steps), desc=desc, leave=False, disable=desc is None):
        idx = torch.randint(0, len(labels), (batch_size,), generator=generator)
        loss = F.cross_entropy(logits(idx), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()
    return module


def train_epochs(module: nn.Module, loss: Callable[[Tensor], Tensor], n: int, epochs: int, batch_size: int,
                 lr: float, seed: int, weight_decay: float = 0.01, warmup: float = 0.1,
                 desc: str | None = None) -> nn.Module:
    """Train every parameter of ``module`` in place on ``loss(idx)`` (mean loss of examples ``idx``) for
    ``epochs`` passes over ``n`` examples, each a permutation drawn from a generator seeded with
    ``seed``, in batches of ``batch_size`` (the last one smaller). AdamW; weight decay on matrices only
    (not on biases and LayerNorm weights); the learning rate rises linearly from 0 to ``lr`` over the
    first ``warmup`` fraction of the steps, then falls linearly to 0. Dropout is on while it trains;
    ``module`` is in eval mode after."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr)
    steps = epochs * -(-n // batch_size)
    warmup_steps = max(1, round(warmup * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: step / warmup_steps if step < warmup_steps else (steps - step) / max(1, steps - warmup_steps)
    )
    generator = torch.Generator().manual_seed(seed)
    module.train()
    with tqdm(total=steps, desc=desc, leave=False, disable=desc is None) as bar:
        for _ in range(epochs):
            for idx in torch.randperm(n, generator=generator).split(batch_size):
                opt.zero_grad()
                loss(idx).backward()
                opt.step()
                schedule.step()
                bar.update()
    module.eval()
    return module


def unpadded_rows(encoding, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Rows ``idx`` of a right-padded encoding's input_ids and attention_mask, without the columns
    that are padding in every one of those rows."""
    mask = encoding["attention_mask"][idx]
    width = int(mask.sum(1).max())
    return encoding["input_ids"][idx, :width], mask[:, :width]


def finetune_clip_vision(clip_model, processor, pixels: Tensor, labels: Tensor, classnames: list[str], templates,
                         steps: int, lr: float, seed: int, trains: Callable[[str], bool] = lambda name: True,
                         desc: str | None = None) -> nn.Module:
    """Train the ``trains`` parameters of ``clip_model.vision_model`` in place (Adam, batch 32)
    through the frozen zero-shot head of ``classnames`` x ``templates`` (FusionBench's
    HFCLIPClassifier: pretrained text tower and projections); returns the vision model."""
    from fusion_bench.models.hf_clip import HFCLIPClassifier

    classifier = HFCLIPClassifier(clip_model, processor=processor)
    classifier.set_classification_task(classnames, templates)
    clip_model.requires_grad_(False)
    vision = clip_model.vision_model
    params = [p for name, p in vision.named_parameters() if trains(name)]
    for p in params:
        p.requires_grad_(True)
    return train_through_head(vision, params, lambda idx: classifier(pixels[idx]), labels, steps, lr, seed,
                              batch_size=32, desc=desc)
