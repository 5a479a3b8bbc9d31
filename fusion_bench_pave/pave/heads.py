"""Which Linear modules of a model are its task head, kept out of PAVE's purification by default.

The head is what a task adds on top of the pretrained network, found from the model's structure
rather than from a list of names:

- every Linear outside the model's body, i.e. outside ``model.base_model`` of a Hugging Face
  ``*For<Task>`` model: RoBERTa's ``classifier.dense`` / ``classifier.out_proj``, BERT's and
  DeBERTa's ``classifier`` (and DeBERTa's ``pooler.dense``, which sits outside its body), GPT-2's and Llama's ``score``, ``qa_outputs``, BERT's MLM head
  ``cls.predictions.transform.dense``, a causal LM's ``lm_head``;
- the output embeddings (``get_output_embeddings()``), wherever they live (T5's and a bare
  model's ``lm_head``, tied or not).

The pooler of BERT-style bodies (``bert.pooler.dense``) is part of the pretrained body: it is
merged like the rest of the body, so it is purified (from one row per sequence, its first token).
A model that is not a Hugging Face model has no known body: only its output embeddings count.
"""

from __future__ import annotations

from torch import nn

def head_modules(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_modules()``) of the Linear modules of ``model``'s task head."""
    names: set[str] = set()
    body = getattr(model, "base_model", model)
    if body is not model:
        inside = {id(module) for module in body.modules()}
        names |= {name for name, module in model.named_modules()
                  if isinstance(module, nn.Linear) and id(module) not in inside}
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if isinstance(output, nn.Linear):
        names |= {name for name, module in model.named_modules() if module is output}
    return names
