"""PAVE's side of a pool's nn.Modules: linear-layer weights as {layer: W [out, in]}, checks before
any work, DARE on raw deltas, and the device of statistics collection."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch
from fusion_bench.method.dare.utils import param_random_drop_
from torch import Tensor, nn

from fusion_bench_pave.attention_layers import attention_modules, in_proj_rows, out_proj_names
from fusion_bench_pave.linear_layers import is_linear, linear_weight, set_linear_weight, type_summary, unhandled_weight_modules
from fusion_bench_pave.tensor_checks import first_nonfinite, first_shape_mismatch

log = logging.getLogger(__name__)


class LinearWeights(Mapping[str, Tensor]):
    """The current weight [out, in] of each linear layer (nn.Linear, transformers Conv1D, whose
    [in, out] weight is seen transposed) of a model, by module name; read at access time, so a
    weight written back is what the next read sees and no old tensor is held. nn.MultiheadAttention's
    layers (attention_layers: '<mha>.in_proj_q|k|v', row blocks of its packed weight, and its
    out_proj) only with `attention`."""

    def __init__(self, model: nn.Module, attention: bool = False):
        out_projs = set() if attention else out_proj_names(model)
        self.modules = {name: m for name, m in model.named_modules() if is_linear(m) and name not in out_projs}
        self.packed = in_proj_rows(model) if attention else {}

    def __getitem__(self, layer: str) -> Tensor:
        if layer in self.packed:
            mha, rows = self.packed[layer]
            return mha.in_proj_weight.data[rows]
        return linear_weight(self.modules[layer])

    def __iter__(self) -> Iterator[str]:
        return iter([*self.modules, *self.packed])

    def __len__(self) -> int:
        return len(self.modules) + len(self.packed)

    def write(self, layer: str, weight: Tensor) -> None:
        """Store `weight` [out, in] in the module's own layout."""
        if layer in self.packed:
            mha, rows = self.packed[layer]
            mha.in_proj_weight.data[rows] = weight
        else:
            set_linear_weight(self.modules[layer], weight)


def check_purifiable(
    model: nn.Module, includes: Callable[[str, Optional[nn.Module]], bool], patterns: list[str], attention: bool = False
) -> dict[str, str]:
    """ValueError unless `model` has a linear layer that `includes` leaves to purify: a run that
    purifies nothing would report the merger's result as PAVE's. Returns, and warns about, the other
    modules with a weight matrix (Conv2d, nn.MultiheadAttention and its out_proj unless `attention`,
    custom layers): their task vectors reach the merger unpurified."""
    linears = LinearWeights(model, attention)
    if not linears:
        raise ValueError(
            f"the model ({type(model).__name__}) has no nn.Linear or transformers Conv1D module; PAVE "
            "purifies the weights of those only, so it would purify nothing."
        )
    if not any(includes(name, None) for name in linears):
        raise ValueError(
            f"exclude_modules={patterns} excludes all {len(linears)} linear layers of the model, so "
            "PAVE would purify nothing; narrow the patterns (null excludes only the heads, [] purifies "
            "every Linear)."
        )
    handled = set(linears.modules) | (set(attention_modules(model)) if attention else set())
    others = {name: kind for name, kind in unhandled_weight_modules(model, lambda m: False).items() if name not in handled}
    if others:
        mha = not attention and any(kind == "MultiheadAttention" for kind in others.values())
        hint = " (purify_attention=true purifies nn.MultiheadAttention's in_proj and out_proj)" if mha else ""
        log.warning(
            "PAVE purifies nn.Linear and transformers Conv1D weights only; the task vectors of these "
            f"modules go to the merger unpurified{hint}: {type_summary(others)}"
        )
    return others


def check_compatible(pretrained: nn.Module, finetuned: Mapping[str, nn.Module]) -> None:
    """Same parameter names and shapes as the pretrained model, and finite weights."""
    if not finetuned:
        raise ValueError("the pool has no fine-tuned models besides _pretrained_; PAVE needs at least one")
    reference = pretrained.state_dict()
    if (key := first_nonfinite(reference)) is not None:
        raise ValueError(f"pretrained model: parameter '{key}' has non-finite values (NaN/inf).")
    for task, model in finetuned.items():
        state = model.state_dict()
        if set(state) != set(reference):
            diff = sorted(set(state) ^ set(reference))[:5]
            raise ValueError(
                f"task '{task}': architecture differs from the pretrained model (parameters {diff} "
                "are not in both); all models of the pool must share one architecture."
            )
        if (key := first_shape_mismatch(reference, state)) is not None:
            raise ValueError(
                f"task '{task}': parameter '{key}' has shape {tuple(state[key].shape)}, pretrained has "
                f"{tuple(reference[key].shape)}; all models of the pool must share one architecture."
            )
        if (key := first_nonfinite(state)) is not None:
            raise ValueError(f"task '{task}': parameter '{key}' has non-finite values (NaN/inf).")


@torch.no_grad()
def dare_(pretrained: nn.Module, finetuned: Mapping[str, nn.Module], config: Mapping, seed: int) -> None:
    """DARE on raw deltas, in place: W_ft <- W_pre + drop(W_ft - W_pre) with FusionBench's random
    drop, seeded; the draws follow its DareTiesMerging (models in pool order, parameters in module
    order, or only nn.Linear weights with only_on_linear_weights: as there, Conv1D weights are not
    dropped then)."""
    ratio, rescale = float(config["sparsity_ratio"]), bool(config.get("rescale", True))
    reference = dict(pretrained.named_parameters(remove_duplicate=False))  # tied lm_head included
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for model in finetuned.values():
            if config.get("only_on_linear_weights", False):
                params = [(f"{n}.weight" if n else "weight", m.weight) for n, m in model.named_modules()
                          if isinstance(m, nn.Linear)]
            else:
                params = list(model.named_parameters())
            for name, param in params:
                delta = param.data - reference[name].data
                param_random_drop_(delta, ratio, rescale)
                param.data = reference[name].data + delta


def pool_with_models(modelpool: Any, models: Mapping[str, nn.Module]) -> Any:
    """A shallow copy of `modelpool` (its class, datasets, tokenizer, processor, ...) whose load_model
    returns `models` by name, also where the pool's class only instantiates configs (e.g. FusionBench's
    CausalLMPool). Its configs stay, so the pool's own helpers that read them still work (e.g.
    CLIPVisionModelPool.load_clip_model, which builds the CLIP text tower of zero-shot heads); where it
    holds instances instead of configs, those are replaced by `models` too."""
    pool = copy.copy(modelpool)
    models = dict(models)
    configured = getattr(pool, "_models", None) or {}
    if any(isinstance(entry, nn.Module) for entry in configured.values()):
        pool._models = {name: models.get(name, entry) for name, entry in configured.items()}
    load_configured = pool.load_model

    def load_model(name_or_config: Any, *args: Any, **kwargs: Any) -> nn.Module:
        if isinstance(name_or_config, str) and name_or_config in models:
            return models[name_or_config]
        return load_configured(name_or_config, *args, **kwargs)

    pool.load_model = load_model
    return pool


@contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """`model` moved to `device` for the block and back to where it was after it."""
    parameter = next(model.parameters(), None)
    home = parameter.device if parameter is not None else device
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)
