"""Full (unsharded) copies of a trainer's trainable weights, under every launch the project supports.

Under FSDP (1 or 2) and DeepSpeed ZeRO-3 each process holds a shard of every parameter; a ``save_pretrained`` of
the local module from the main process would write shards (FSDP2: ``DTensor`` local pieces, ZeRO-3: empty
placeholders). :func:`trainable_state_dict` is the one gather the stages use before writing an adapter and a
projection head: **every process must call it** (it is a collective under sharding); the main process receives the
full tensors, the others ``None``.

How, per launch (``trainer.accelerator.distributed_type``):

* FSDP (1 and 2): ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with
  ``StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)``: only the trainable
  parameters are all-gathered (not the frozen base), onto rank 0's CPU. Keys are the module's own parameter names
  (FSDP wrapper prefixes removed by torch).
* DeepSpeed ZeRO-3: the engine's ``_zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)``, the call
  ``Trainer.save_model`` makes for peft models (the engine's parameter dtype; the fp32 master copy stays in the
  optimizer state of the checkpoint).
* DDP, ZeRO-1/2, one process: the local trainable parameters (identical on every rank), detached CPU copies.
"""
from __future__ import annotations

import torch

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter name without the wrapper modules' prefixes (FSDP1, activation checkpointing, torch.compile),
    as torch's state-dict API returns them."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _trainable_names(module) -> list[str]:
    return [clean_name(n) for n, p in module.named_parameters() if p.requires_grad]


def trainable_state_dict(trainer) -> dict[str, torch.Tensor] | None:
    """{parameter name: full CPU tensor} of every trainable parameter of ``trainer.model`` (LoRA matrices, the
    projection head), gathered across processes.

    Args:
        trainer: a ``transformers.Trainer`` after (or during) ``train()``; its ``accelerator`` says how the model is
            wrapped.
    Returns:
        the dict on the main process (names as ``trainer.model.named_parameters()`` gives them, wrapper prefixes
        removed (:func:`clean_name`), e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``),
        ``None`` on the others.
    Raises:
        RuntimeError: a trainable parameter is missing from the gathered dict (a wrapper renamed it), so the caller
            never writes an incomplete adapter.
    """
    from accelerate.utils import DistributedType

    acc = trainer.accelerator
    model = acc.unwrap_model(trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model)
    names = _trainable_names(model)
    kind = acc.distributed_type
    if kind == DistributedType.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        state = get_model_state_dict(trainer.model_wrapped, options=opts)
    elif kind == DistributedType.DEEPSPEED and trainer.model_wrapped is not None and \
            acc.deepspeed_config.get("zero_optimization", {}).get("stage") == 3:
        state = trainer.model_wrapped._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
    else:
        params = dict(model.named_parameters())
        state = {n: params[n].detach() for n in names}
    if not acc.is_main_process:
        return None
    wanted = set(names)
    state = {clean_name(k): v.detach().to("cpu").contiguous().clone() for k, v in state.items()
             if clean_name(k) in wanted}
    missing = [n for n in names if n not in state]
    if missing:
        raise RuntimeError(f"the gathered state dict lacks {len(missing)} trainable parameter(s), e.g. {missing[:3]} "
                           f"(launch: {kind}); nothing was written")
    return state


def sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix`` (a submodule name, e.g. ``causal_projection_head``), with the
    prefix and its dot removed; empty when there are none."""
    p = prefix.rstrip(".") + "."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
