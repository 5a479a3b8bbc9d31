"""Pretraining of the small CLIP model: image-caption contrastive training from scratch.

Captions are prompt templates of a concept ("a photo of a sandal.", "the digit seven."). Each step
embeds every concept's captions with the text tower (mean of the normalised template embeddings,
renormalised: exactly how zero-shot heads are built later) and trains both towers and the logit
scale with cross-entropy of ``scale * cosine`` between a batch of images and all concepts. The
pretraining images are Fashion-MNIST training rows reserved for it, digits rendered here in the
bundled Pillow font (distorted, so the handwritten-digit tasks start from printed digits, not from
their own data) and crops of scikit-image photographs that no task uses.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm.auto import tqdm

from fusion_bench_pave.assets.image_tasks import SIZE

# CLIP's image normalisation (CLIPImageProcessor's defaults)
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def render_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` printed digits (28x28 uint8, white on black) with random size, stroke, position,
    rotation, shear, elastic distortion and blur, and their labels (balanced)."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    rng = np.random.default_rng(seed)
    fonts = {size: ImageFont.load_default(size=size) for size in range(14, 25)}
    grid = np.mgrid[:SIZE, :SIZE].astype(float)
    images, labels = [], np.arange(n) % 10
    for label in labels:
        canvas = Image.new("L", (2 * SIZE, 2 * SIZE))
        draw = ImageDraw.Draw(canvas)
        font = fonts[int(rng.integers(14, 25))]
        draw.text((SIZE, SIZE), str(label), fill=int(rng.integers(180, 256)), font=font, anchor="mm",
                  stroke_width=int(rng.integers(0, 3)), stroke_fill=255)
        shear = float(rng.uniform(-0.3, 0.3))
        canvas = canvas.transform(canvas.size, Image.AFFINE, (1, shear, -shear * SIZE, 0, 1, 0), resample=Image.BILINEAR)
        canvas = canvas.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR)
        dx, dy = rng.integers(-3, 4, 2)
        box = (SIZE // 2 + dx, SIZE // 2 + dy, SIZE // 2 + dx + SIZE, SIZE // 2 + dy + SIZE)
        digit = np.asarray(canvas.crop(box).filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1)))), dtype=float)
        warp = np.stack([gaussian_filter(rng.uniform(-1, 1, (SIZE, SIZE)), 4) * 20 for _ in range(2)])
        images.append(map_coordinates(digit, grid + warp, order=1, mode="constant").clip(0, 255).astype(np.uint8))
    return np.stack(images), labels.astype(np.int64)


def shift(images: np.ndarray, rng: np.random.Generator, max_shift: int = 2) -> np.ndarray:
    """Each image translated by up to ``max_shift`` pixels (wrapping), a cheap augmentation."""
    dy, dx = rng.integers(-max_shift, max_shift + 1, (2, len(images)))
    return np.stack([np.roll(im, (y, x), axis=(0, 1)) for im, y, x in zip(images, dy, dx)])


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) uint8 grayscale -> (N, 3, 28, 28) normalised like the zoo's CLIPImageProcessor."""
    x = torch.from_numpy(images).float().div(255.0)[:, None].expand(-1, 3, -1, -1)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def concept_embeddings(clip_model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       n_templates: int) -> torch.Tensor:
    """(concepts, dim) unit vectors: normalised mean over each concept's ``n_templates`` captions
    (rows of ``input_ids`` are concept-major)."""
    text = clip_model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    text = getattr(text, "pooler_output", text)
    text = F.normalize(text, dim=-1).view(-1, n_templates, text.shape[-1]).mean(1)
    return F.normalize(text, dim=-1)


def pretrain_clip(clip_model, tokenizer, sources: list[tuple[np.ndarray, np.ndarray, list[str], list[Callable]]],
                  steps: int, lr: float, batch_size: int, seed: int) -> None:
    """Train ``clip_model`` in place. ``sources``: (images, labels, classnames, templates); every
    source has the same number of templates. Batches draw equally from each source."""
    n_templates = len(sources[0][3])
    captions = [t(c) for _, _, names, temps in sources for c in names for t in temps]
    enc = tokenizer(captions, padding=True, return_tensors="pt")
    offsets = np.cumsum([0] + [len(names) for _, _, names, _ in sources])
    generator = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(clip_model.parameters(), lr=lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    clip_model.train()
    per_source = batch_size // len(sources)
    for _ in tqdm(range(steps), desc="pretrain CLIP", leave=False):
        picks = [(s, generator.integers(0, len(src[1]), per_source)) for s, src in enumerate(sources)]
        pixels = pixel_values(shift(np.concatenate([sources[s][0][idx] for s, idx in picks]), generator))
        labels = torch.from_numpy(np.concatenate([sources[s][1][idx] + offsets[s] for s, idx in picks]))
        image = clip_model.get_image_features(pixel_values=pixels)
        image = F.normalize(getattr(image, "pooler_output", image), dim=-1)
        heads = concept_embeddings(clip_model, enc["input_ids"], enc["attention_mask"], n_templates)
        loss = F.cross_entropy(clip_model.logit_scale.exp() * image @ heads.T, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            clip_model.logit_scale.clamp_(0, 4.6052)  # CLIP's cap: scale <= 100
    clip_model.eval()
