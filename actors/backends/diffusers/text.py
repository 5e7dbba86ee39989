"""The `encode` block: a text encoder on the prompt, as the family's `encode_prompt` runs it.

Runs in an actor process. The prompt and (CFG) the negative prompt are encoded in
separate calls, as the pipelines do; the output is `[negative; positive]` embeddings (and
pooled embeddings from a projection encoder, and a T5 sequence under its own key).
"""

from __future__ import annotations

import torch

from actors.backends.diffusers.loading import ActorModel
from actors.store import Bundle
from broker.protocol.messages import TaskSpec
from broker.protocol.tasks import EncodeParams, TaskKind


class EncodeBlock:
    kind = TaskKind.ENCODE
    components = ("text_encoder",)
    params = EncodeParams

    def __call__(self, model: ActorModel, task: TaskSpec, inputs: list[Bundle]) -> Bundle:
        params: EncodeParams = task.params
        positive = _embed(model, params.prompt)
        if task.rows == 2:  # CFG: [negative; positive], each encoded on its own like the pipeline
            negative = _embed(model, params.negative_prompt or "")
            return {k: torch.cat([negative[k], positive[k]]) for k in positive}
        return positive


def _embed(model: ActorModel, text: str) -> dict[str, torch.Tensor]:
    encoder, tokenizer, family = model.component, model.tokenizer, model.family
    if encoder.config.model_type == "t5":
        return _embed_t5(model, text)
    if family.clip_pooled_only:  # FluxPipeline: CLIP gives the pooled vector only
        ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_overflowing_tokens=False, return_length=False, return_tensors="pt").input_ids
        pooled = encoder(ids.to(model.device), output_hidden_states=False).pooler_output
        return {"pooled": pooled.to(dtype=model.dtype, device=model.device)}
    tokens = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    ids = tokens.input_ids.to(model.device)
    if family.penultimate_hidden:
        out = encoder(ids, output_hidden_states=True)
        embeds = {"embeds": out.hidden_states[-2]}  # SDXL and SD3 condition on the penultimate layer
        if out[0].ndim == 2:  # a projection encoder: its pooled output conditions too
            embeds["pooled"] = out[0]
        return {k: v.to(dtype=model.dtype, device=model.device) for k, v in embeds.items()}
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        mask = tokens.attention_mask.to(model.device)
    return {"embeds": encoder(ids, attention_mask=mask)[0].to(dtype=model.dtype, device=model.device)}


def _embed_t5(model: ActorModel, text: str) -> dict[str, torch.Tensor]:
    """The T5 sequence, padded to the pipeline's `max_sequence_length` (Flux 512, SD3 256).

    Its own key (`t5`): SD3 tells it from the CLIP hidden states it is joined with."""
    ids = model.tokenizer(text, padding="max_length", max_length=model.family.t5_sequence, truncation=True,
                          add_special_tokens=True, return_length=False, return_overflowing_tokens=False,
                          return_tensors="pt").input_ids
    return {"t5": model.component(ids.to(model.device))[0].to(dtype=model.dtype, device=model.device)}
