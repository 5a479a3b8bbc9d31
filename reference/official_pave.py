"""The PAVE baseline of the tests and benchmarks: a re-implementation of the official procedure
(github ABgit111/purified_task_vector, ViT/src/rank_strategy.py and ViT/src/task_vectors.py),
written from scratch and sharing no code with fusion_bench_pave.pave.

What it keeps from the official code, i.e. what makes it slow and memory hungry:
- forward hooks *store* every Linear's input rows X [N, d_in], one concatenated copy per Linear
  (q/k/v each keep their own), for all layers of a model at once;
- C = X^T X / N per Linear, in the model dtype (float32, like the official GPU code);
- eps doubling from eps0 with an explicit inverse at every step until ||C_eps^-1 C_eps - I||_F < tol;
- pass 1 (rank search): per model, forward + covariances + doubling + svdvals(W C_eps), greedy
  trimming of the globally smallest normalised singular value until kept/(T*R) < rho (floor
  R - round(1.5 * (R - round(rho * R)))), then one kept ratio per model (sum_l r_ml / sum_l R_l);
- pass 2 (task vectors): per model, forward again, covariances and doubling again, full SVD of
  W C_eps, W_tilde = U_r S_r V_r^T C_eps^-1 with r = max(1, round(ratio_m * R)), tau = W_tilde - W_pre.

Left out (known defects, each one makes this baseline faster than the official code, never slower):
pass 2 hooks only the fine-tuned model (the official one also runs and hooks the pretrained model and
adds that covariance's inverse error to the doubling check, coupling eps to the pretrained model,
unlike pass 1 and the paper); nothing is copied to a GPU. Non-Linear parameters keep the plain
difference W_ft - W_pre, as in the official code.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

Batches = Iterable[dict]


def linear_modules(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """Every nn.Linear of `model` by name, minus names ending in one of `exclude`."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not name.endswith(exclude)
    }


@torch.no_grad()
def collect_layer_inputs(
    model: nn.Module, batches: Batches, num_rows: int, exclude: tuple[str, ...] = ()
) -> dict[str, Tensor]:
    """Store the input rows of every Linear (flattened batch x sequence) and keep the first
    `num_rows` of each; forwarding stops once every hooked Linear has that many."""
    modules = linear_modules(model, exclude)
    stored: dict[str, list[Tensor]] = {name: [] for name in modules}
    seen = dict.fromkeys(modules, 0)

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            stored[name].append(x.cpu())
            seen[name] += x.shape[0]

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]
    model.eval()
    try:
        for inputs in batches:
            model(**inputs)
            if min(seen.values()) >= num_rows:
                break
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(xs, dim=0)[:num_rows] for name, xs in stored.items() if xs}


def doubling_inverse(cov: Tensor, eps0: float, tol: float = 5e-2) -> tuple[Tensor, Tensor, float]:
    """(C_eps, C_eps^-1, eps): double eps from eps0, inverting C + eps I each time, until
    ||C_eps^-1 C_eps - I||_F < tol."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    eps = eps0
    while True:
        reg = cov + eps * eye
        inv = torch.inverse(reg)
        if torch.norm(inv @ reg - eye) < tol:
            return reg, inv, eps
        eps *= 2


def rank_search(
    models: Mapping[str, nn.Module],
    batches: Mapping[str, Batches],
    rho: float,
    num_rows: int,
    eps0: float,
    tol: float = 5e-2,
    exclude: tuple[str, ...] = (),
) -> dict[str, float]:
    """Pass 1: kept rank ratio per model from the spectra of W C_eps."""
    spectra: dict[str, dict[str, Tensor]] = {}
    full_rank: dict[str, int] = {}
    for task, model in models.items():
        inputs = collect_layer_inputs(model, batches[task], num_rows, exclude)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for layer in list(inputs):
                x = inputs.pop(layer)
                cov = x.T @ x / num_rows
                del x
                reg, _, _ = doubling_inverse(cov, eps0, tol)
                s = torch.linalg.svdvals(params[f"{layer}.weight"] @ reg)
                spectra.setdefault(layer, {})[task] = s / s.max()
                full_rank[layer] = s.numel()
    kept = {task: 0 for task in models}
    for layer, by_model in spectra.items():
        for task, rank in greedy_trim(by_model, full_rank[layer], rho).items():
            kept[task] += rank
    total = sum(full_rank.values())
    return {task: kept[task] / total for task in models}


def greedy_trim(spectra: Mapping[str, Tensor], full_rank: int, rho: float) -> dict[str, int]:
    """Drop the globally smallest remaining normalised singular value (models above the stopping
    rank only) while kept/(T*R) >= rho."""
    stopping = full_rank - round((full_rank - round(full_rank * rho)) * 3 / 2)
    kept = {task: full_rank for task in spectra}
    total_full = full_rank * len(spectra)
    total = total_full
    while total / total_full >= rho:
        smallest, chosen = float("inf"), None
        for task, s in spectra.items():
            if kept[task] > 0 and kept[task] > stopping and s[kept[task] - 1] < smallest:
                smallest, chosen = s[kept[task] - 1].item(), task
        if chosen is None:
            break
        kept[chosen] -= 1
        total -= 1
    return kept


@torch.no_grad()
def purified_task_vector(
    pretrained: nn.Module,
    finetuned: nn.Module,
    batches: Batches,
    rank_ratio: float,
    num_rows: int,
    eps0: float,
    tol: float = 5e-2,
    exclude: tuple[str, ...] = (),
) -> dict[str, Tensor]:
    """Pass 2: tau per parameter; hooked Linear weights get W_tilde - W_pre in the inverse form."""
    inputs = collect_layer_inputs(finetuned, batches, num_rows, exclude)
    pre = dict(pretrained.named_parameters())
    vector = {}
    for name, weight in finetuned.named_parameters():
        layer = name[: -len(".weight")]
        if not name.endswith(".weight") or layer not in inputs:
            vector[name] = weight - pre[name]
            continue
        x = inputs[layer]
        cov = x.T @ x / num_rows
        reg, inv, _ = doubling_inverse(cov, eps0, tol)
        u, s, vh = torch.linalg.svd(weight @ reg, full_matrices=False)
        r = max(1, round(len(s) * rank_ratio))
        w_tilde = (u[:, :r] @ torch.diag(s[:r]) @ vh[:r, :]) @ inv
        vector[name] = w_tilde - pre[name]
    return vector


def official_pave(
    pretrained: nn.Module,
    finetuned: Mapping[str, nn.Module],
    batches: Mapping[str, Batches],
    rho: float,
    num_rows: int,
    eps0: float = 0.1,
    tol: float = 5e-2,
    exclude: tuple[str, ...] = (),
) -> tuple[dict[str, dict[str, Tensor]], dict[str, float]]:
    """Both passes: ({task: purified task vector}, {task: kept rank ratio}). `batches[task]` must be
    re-iterable: both passes forward it."""
    ratios = rank_search(finetuned, batches, rho, num_rows, eps0, tol, exclude)
    vectors = {
        task: purified_task_vector(pretrained, model, batches[task], ratios[task], num_rows, eps0, tol, exclude)
        for task, model in finetuned.items()
    }
    return vectors, ratios
