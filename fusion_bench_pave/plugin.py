"""Everything this package changes in the process, in one place: the transformers-5 and Python-3.11
repairs of fusion_bench 0.2.33's imports (``compat``), the OmegaConf resolvers our yaml uses, the registration of
Smile{Mistral,Llama,Qwen2,Gemma2,Phi3}ForCausalLM with transformers' Auto classes, and of SMILE's file format
with the model pools' atomic save.

Imported by the Hydra search-path plugin (so every ``fusion_bench`` run has it before any config is
composed) and by our FusionBench-facing modules (algorithms, pools, task pools). The math modules
do not import it, so they load with torch alone. In a plain Python process that loads a saved SMILE
causal LM with ``AutoModelForCausalLM``, ``import fusion_bench_pave.plugin`` first.
"""

from fusion_bench_pave.compat import patch_transformers_for_fusion_bench, patch_typing_override
from fusion_bench_pave.resolvers import register_resolvers

patch_transformers_for_fusion_bench()
patch_typing_override()
register_resolvers()

from fusion_bench_pave.smile import causal_lm  # noqa: E402,F401  (registers the Auto classes)
from fusion_bench_pave.io.formats import register_model_format  # noqa: E402
from fusion_bench_pave.io.smile import SMILE_FORMAT  # noqa: E402

register_model_format(SMILE_FORMAT)
