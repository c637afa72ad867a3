"""Batched, left-padded chat generation with the project's template (samples, critique-and-rewrite, evaluation)."""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from staged_alignment.core.chat_template import render_prompt


@torch.no_grad()
def generate_chat(model, tokenizer, conversations: Sequence[list[dict]], *, max_new_tokens: int = 128,
                  batch_size: int = 8, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                  progress: bool = False, desc: str = "generating") -> list[dict]:
    """Answer each conversation (ending in a user turn) with the model.

    Prompts are rendered with the tokenizer's chat template (the project's Zephyr template), tokenized without
    extra special tokens and left-padded in batches of ``batch_size``. Returns, per conversation,
    ``{"text": str (special tokens stripped), "n_tokens": int, "truncated": bool}``; ``truncated`` is True
    when generation hit ``max_new_tokens`` without an eos.
    """
    prev_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos_id = tokenizer.eos_token_id
    results: list[dict] = []
    try:
        batches = range(0, len(conversations), batch_size)
        for start in tqdm(batches, desc=desc, disable=not progress):
            chunk = conversations[start:start + batch_size]
            prompts = [render_prompt(tokenizer, c) for c in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=eos_id)
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p)
            out = model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1]:]
            for row in new:
                ids = row.tolist()
                ended = eos_id in ids
                if ended:
                    ids = ids[:ids.index(eos_id)]
                else:
                    ids = [t for t in ids if t != tokenizer.pad_token_id]
                results.append({"text": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                                "n_tokens": len(ids), "truncated": not ended})
    finally:
        tokenizer.padding_side = prev_side
        model.train(was_training)
    return results
