"""Sharded training on CPU: FSDP2 saves equal one process's, sharded checkpoints resume, loss scale across ranks.

The SFT (``trainers.sft.ZephyrSFTTrainer``), DPO (``trainers.dpo.ConstitutionalDPOTrainer``) and causal
(``trainers.causal.CausalContrastiveTrainer``, every term on, with its projection head) trainers train 4 optimizer
steps of the tiny Llama of ``tests/conftest.py`` on the same global batch, launched three ways:

* ``single``: one process, ``per_device_train_batch_size = 2·b``;
* ``ddp``: ``torchrun --nproc_per_node 2`` (gloo), ``b`` per process, DistributedDataParallel;
* ``fsdp``: ``torchrun --nproc_per_node 2`` (gloo), ``b`` per process, FSDP2 (``fully_shard`` per decoder layer,
  through accelerate's own FSDP plugin and ``fsdp2_prepare_model``; ``SHARDED_STATE_DICT`` checkpoints every 2
  steps).

After ``train()`` every process calls :func:`core.sharded.trainable_state_dict` and the main process writes
the adapter (peft ``save_pretrained``) and the head exactly as the stage scripts do. The tests then check:

* the adapters and heads written under FSDP and DDP equal the single-process ones (max |Δ| ≤ 1e-6). The runs use
  plain SGD (lr 0.1): Adam divides by √v + ε, which turns float reduction-order differences (an all-reduce sums in
  another order than one big batch) in near-zero gradient components into update differences up to lr/ε times
  larger; with AdamW at lr 5e-3 the same comparison measured max |Δ| = 1.4e-6 (DPO);
* loss scale: the logged ``loss`` and ``grad_norm`` of every step at world size 2 equal those at world size 1
  (relative 1e-5); a loss scaled by the world size on every rank would double both;
* a second FSDP launch resumed from the sharded ``checkpoint-2`` logs the same losses for steps 3 and 4 and ends
  with the same adapter as the uninterrupted run.

FSDP on CPU: accelerate 1.15 selects FSDP only for accelerator launches (``MULTI_GPU``, …), so on a CPU
(``MULTI_CPU``, gloo) it would silently use DDP. The worker lets it select FSDP (:func:`_allow_fsdp_on_cpu`);
everything after that (plugin, wrapping, sharded checkpoints, state-dict gathering) is accelerate's and torch's
own code. Four launches, about 90 s on 2 cores: part of the default test run (CI).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # worker mode: make the project and conftest importable
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))

import pytest

STAGES = ("sft", "dpo", "causal")
STEPS, B = 4, 2  # optimizer steps; rows per process per micro-batch (single process: 2·B)


# --------------------------------------------------------------------------------------------- worker side
def _allow_fsdp_on_cpu() -> None:
    """Let accelerate select FSDP on a CPU launch: after ``AcceleratorState``'s own init with an FSDP plugin on a
    ``MULTI_CPU`` (gloo) launch, set the distributed type to FSDP, as it does for GPU launches."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState().distributed_type = DistributedType.FSDP

    AcceleratorState.__init__ = patched


def _training(mode: str, stage: str, out: Path, resume: bool) -> dict:
    t = dict(max_steps=STEPS, per_device_train_batch_size=B * (2 if mode == "single" else 1), learning_rate=0.1, optim="sgd",
             logging_steps=1, disable_tqdm=True, warmup_steps=0, train_sampling_strategy="random",
             gradient_accumulation_steps=2 if stage != "dpo" else 1, save_strategy="no", report_to="none",
             dataloader_num_workers=0)
    if mode == "fsdp":
        t.update(fsdp=True, save_strategy="steps", save_steps=2, save_total_limit=None,
                 fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                              "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT",
                              "cpu_ram_efficient_loading": False})
    return t


def _sft_trainer(model_dir, cfg, args_dir):
    from datasets import Dataset
    from test_distributed import SFT_ROWS
    from trl import SFTConfig

    from staged_alignment.core.common import build_training_args
    from staged_alignment.core.models import load_model, load_tokenizer, lora_config
    from staged_alignment.stages.stage0_sft import sft_defaults
    from staged_alignment.trainers.sft import ZephyrSFTTrainer

    args = build_training_args(SFTConfig, cfg, "sft", args_dir, **sft_defaults(cfg))
    tok = load_tokenizer(str(model_dir), cfg.model)
    model = load_model(str(model_dir), cfg.model, device="cpu")
    return ZephyrSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(SFT_ROWS), processing_class=tok,
                            peft_config=lora_config(cfg.lora)), tok, None


DPO_ROWS = [{"prompt": [{"role": "user", "content": f"How do I get into locked account number {i}?"}],
             "chosen": [{"role": "assistant", "content": "Use the official recovery page of the service."}],
             "rejected": [{"role": "assistant", "content": "Guess the password a few times" + " again" * (i % 3)}]}
            for i in range(16)]


def _dpo_trainer(model_dir, cfg, args_dir):
    from datasets import Dataset
    from trl import DPOConfig

    from staged_alignment.core.common import build_training_args
    from staged_alignment.core.models import load_model, load_tokenizer, lora_config
    from staged_alignment.stages.stage1_dpo import dpo_defaults
    from staged_alignment.trainers.dpo import ConstitutionalDPOTrainer

    args = build_training_args(DPOConfig, cfg, "dpo", args_dir, **dpo_defaults(cfg))
    tok = load_tokenizer(str(model_dir), cfg.model)
    model = load_model(str(model_dir), cfg.model, device="cpu")
    return ConstitutionalDPOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(DPO_ROWS),
                                    processing_class=tok, peft_config=lora_config(cfg.lora)), tok, None


def _causal_trainer(model_dir, cfg, args_dir):
    from peft import get_peft_model
    from test_distributed import _triplets
    from transformers import TrainingArguments

    from staged_alignment.core.causal_objective import needed_views
    from staged_alignment.core.common import build_training_args
    from staged_alignment.core.models import load_model, load_tokenizer, lora_config
    from staged_alignment.data_builders.token_cache import TripletCollator, build_token_cache
    from staged_alignment.data_builders.triplets import write_triplets
    from staged_alignment.stages.stage2_causal import causal_defaults
    from staged_alignment.trainers.causal import CausalContrastiveTrainer
    from staged_alignment.trainers.causal_losses import build_projection_head

    args = build_training_args(TrainingArguments, cfg, "causal", args_dir, **causal_defaults(cfg))
    tok = load_tokenizer(str(model_dir), cfg.model)
    rank = int(os.environ.get("RANK", "0"))
    work = Path(args_dir).parent / f"causal-data-rank{rank}"
    path = write_triplets(work / "triplets.jsonl", _triplets(16))
    ds, _ = build_token_cache(path, tok, 400, work / "cache")
    model = get_peft_model(load_model(str(model_dir), cfg.model, device="cpu"), lora_config(cfg.lora))
    head = build_projection_head("mlp", model.get_base_model().config.hidden_size, 8, 16, seed=cfg.seed)
    loss = dict(lambda_lm_injected=1.0, lambda_kl=0.5, lambda_pref=0.5, contrastive="v2", temperature=0.1)
    views, lm_views = needed_views(**loss)
    trainer = CausalContrastiveTrainer(model=model, args=args, train_dataset=ds,
                                       data_collator=TripletCollator(tok.pad_token_id, views=views, lm_views=lm_views),
                                       processing_class=tok, projection_head=head, views=views, lm_views=lm_views,
                                       **loss)
    return trainer, tok, head


def _train_and_save(model_dir: Path, out: Path, stage: str, mode: str, resume: bool) -> None:
    from test_distributed import _tiny_cfg

    from staged_alignment.core.common import save_adapter, seed_everything
    from staged_alignment.core.sharded import sub_state, trainable_state_dict
    from staged_alignment.trainers.causal import HEAD_ATTR, save_projection_head

    cfg = _tiny_cfg(model_dir, out, stage, _training(mode, stage, out, resume))
    seed_everything(cfg.seed)
    ckpt_dir = out / f"{stage}-ckpt"
    build = {"sft": _sft_trainer, "dpo": _dpo_trainer, "causal": _causal_trainer}[stage]
    trainer, tok, head = build(model_dir, cfg, ckpt_dir)
    trainer.train(resume_from_checkpoint=str(ckpt_dir / "checkpoint-2") if resume else None)
    weights = trainable_state_dict(trainer)  # every process
    tag = f"{stage}-{mode}" + ("-resumed" if resume else "")
    if trainer.accelerator.is_main_process:
        writers = {}
        if head is not None:
            writers = {"causal_projection.safetensors":
                       lambda p: save_projection_head(head, p.parent, None, state=sub_state(weights, HEAD_ATTR))}
        save_adapter(trainer.model, tok, out / tag, extra_files=writers, state_dict=weights)
        info = {"world_size": trainer.accelerator.num_processes, "wrapped": type(trainer.model_wrapped).__name__,
                "distributed_type": str(trainer.accelerator.distributed_type), "steps": trainer.state.global_step,
                "log": [{k: h[k] for k in ("step", "loss", "grad_norm") if k in h} for h in trainer.state.log_history
                        if "loss" in h]}
        (out / f"{tag}.json").write_text(json.dumps(info))
    trainer.accelerator.wait_for_everyone()


def worker_main(argv: list[str]) -> int:
    """``python tests/test_sharded.py MODEL_DIR OUT_DIR MODE STAGE[,STAGE] [resume]`` (under torchrun for ddp/fsdp)."""
    import torch

    model_dir, out, mode, stages = Path(argv[0]), Path(argv[1]), argv[2], argv[3].split(",")
    resume = len(argv) > 4 and argv[4] == "resume"
    torch.set_num_threads(1)
    if mode == "fsdp":
        _allow_fsdp_on_cpu()
    out.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        _train_and_save(model_dir, out, stage, mode, resume)
    return 0


# --------------------------------------------------------------------------------------------- test side
def _launch(argv: list[str], distributed: bool, timeout: int = 900) -> subprocess.CompletedProcess:
    from test_distributed import _torchrun_script

    if distributed:
        return _torchrun_script(argv, timeout)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One folder per launch mode, each holding ``<stage>-<mode>/`` (adapter, head) and ``<stage>-<mode>.json``."""
    from conftest import build_tiny_model

    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny-sharded"))
    out, seconds = {}, {}
    for mode, extra in (("single", []), ("ddp", []), ("fsdp", []), ("fsdp", ["resume"])):
        folder = tmp_path_factory.getbasetemp() / f"sharded-{mode}"
        t0 = time.time()
        proc = _launch([str(Path(__file__).resolve()), str(model_dir), str(folder), mode, ",".join(STAGES), *extra],
                       distributed=mode != "single")
        seconds[mode + "".join(extra)] = round(time.time() - t0, 1)
        assert proc.returncode == 0, f"{mode} {extra} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        out[mode] = folder
    print(f"sharded launches, wall seconds: {seconds}")
    return out


def _saved(folder: Path) -> dict:
    from safetensors.torch import load_file

    state = load_file(str(folder / "adapter_model.safetensors"))
    if (folder / "causal_projection.safetensors").exists():
        state.update({f"head.{k}": v for k, v in load_file(str(folder / "causal_projection.safetensors")).items()})
    return state


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a, (sorted(a)[:4], sorted(b)[:4])
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_sharded_save_equals_single_process(runs, stage, mode):
    info = json.loads((runs[mode] / f"{stage}-{mode}.json").read_text())
    assert info["world_size"] == 2 and info["steps"] == STEPS, info
    expected = {"fsdp": ("DistributedType.FSDP", "FSDP"), "ddp": ("DistributedType.MULTI_CPU", "DistributedDataParallel")}
    assert info["distributed_type"] == expected[mode][0] and info["wrapped"].startswith(expected[mode][1]), info
    single, sharded = _saved(runs["single"] / f"{stage}-single"), _saved(runs[mode] / f"{stage}-{mode}")
    if stage == "causal":
        assert sum(k.startswith("head.") for k in single) == 4  # the mlp head: 2 Linear layers, weights and biases
    init = {k: v for k, v in single.items() if "lora_B" in k}
    assert all(float(v.abs().max()) > 0 for v in init.values()), "LoRA B did not move: nothing to compare"
    diff = _max_diff(single, sharded)
    print(f"{stage} {mode}: max |saved − single-process| = {diff:.3g}")
    assert diff <= 1e-6


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_loss_and_grad_norm_do_not_depend_on_world_size(runs, stage, mode):
    one = json.loads((runs["single"] / f"{stage}-single.json").read_text())["log"]
    two = json.loads((runs[mode] / f"{stage}-{mode}.json").read_text())["log"]
    assert [h["step"] for h in one] == [h["step"] for h in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (stage, mode, a, b)


@pytest.mark.parametrize("stage", STAGES)
def test_fsdp_resume_from_sharded_checkpoint(runs, stage):
    folder = runs["fsdp"]
    ckpt = folder / f"{stage}-ckpt" / "checkpoint-2"
    assert any(p.name.startswith("pytorch_model_fsdp") for p in ckpt.iterdir()), sorted(os.listdir(ckpt))
    full = json.loads((folder / f"{stage}-fsdp.json").read_text())["log"]
    resumed = [h for h in json.loads((folder / f"{stage}-fsdp-resumed.json").read_text())["log"] if h["step"] > 2]
    assert [h["step"] for h in resumed] == [3, 4]  # (steps 1-2: the log history restored from the checkpoint)
    for a, b in zip(full[2:], resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), (stage, a, b)
    assert _max_diff(_saved(folder / f"{stage}-fsdp"), _saved(folder / f"{stage}-fsdp-resumed")) <= 1e-6


if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1:]))
