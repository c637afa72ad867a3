"""Token cache, collator, the causal trainer (exact gradient accumulation, head persistence) and the stage."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from staged_alignment.core.causal_objective import needed_views
from staged_alignment.core.chat_template import apply_template, prompt_ids, prompt_response_ids
from staged_alignment.core.jsonl_io import DataError
from staged_alignment.data_builders.token_cache import (
    VIEWS,
    TripletCollator,
    _MapFn,
    build_token_cache,
    cache_fingerprint,
)
from staged_alignment.data_builders.triplets import (
    build_triplets,
    read_attacks,
    read_tasks,
    triplet_messages,
    write_triplets,
)
from staged_alignment.trainers.causal import (
    HEAD_CONFIG,
    HEAD_WEIGHTS,
    CausalContrastiveTrainer,
    encode_prompts,
    encode_views,
    load_projection_head,
    save_projection_head,
)
from staged_alignment.trainers.causal_losses import build_projection_head, pool_hidden_states

REPO = Path(__file__).resolve().parents[1]
SEED_TASKS = REPO / "data_builders" / "seed" / "tasks.jsonl"
SEED_ATTACKS = REPO / "data_builders" / "seed" / "attacks_train.json"
SEED_CANARY_ATTACKS = REPO / "data_builders" / "seed" / "attacks_train_canary.json"


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return apply_template(AutoTokenizer.from_pretrained(tiny_model_dir))


def seed_triplets(n, seed=0, control_fraction=0.0):
    """Seed triplets with every hijack filled (task attacks get a fixed obeying answer instead of a model's)."""
    res = build_triplets(read_tasks(str(SEED_TASKS)), [read_attacks(str(SEED_ATTACKS)),
                                                       read_attacks(str(SEED_CANARY_ATTACKS))],
                         seed=seed, max_triplets=n, control_fraction=control_fraction)
    for t in res.triplets:
        if not t["hijack"]:
            t["hijack"], t["hijack_source"] = "Sure, here is what you asked for instead.", "test"
    return res.triplets


@pytest.fixture(scope="module")
def triplets_file(tmp_path_factory):
    return write_triplets(tmp_path_factory.mktemp("trip") / "triplets.jsonl", seed_triplets(12))


@pytest.fixture(scope="module")
def dataset(triplets_file, tok, tmp_path_factory):
    ds, _ = build_token_cache(triplets_file, tok, 512, tmp_path_factory.mktemp("cache"))
    return ds


def peft_model(model_dir, seed=0, lora_init=False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # default: random B, so every LoRA weight gets a gradient; lora_init=True: B = 0 (policy = reference)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                     task_type="CAUSAL_LM", init_lora_weights=lora_init)
    return get_peft_model(model, cfg)


OBJECTIVES = {  # name → CausalContrastiveTrainer loss kwargs
    "v1": dict(contrastive="v1", variant="cosine", temperature=0.2, lambda_causal=0.7, lambda_spurious=1.3),
    "lm_injected": dict(contrastive="none", lambda_lm_injected=1.0),
    "margin_lm": dict(contrastive="v1", variant="margin", margin_floor=-0.5, lambda_lm_injected=0.5),
    "infonce": dict(contrastive="v1", variant="infonce", temperature=0.2),
    "kl": dict(contrastive="none", lambda_lm_injected=1.0, lambda_kl=0.7),
    "pref": dict(contrastive="none", lambda_lm_injected=1.0, lambda_pref=0.8, pref_beta=0.3),
    "v2": dict(contrastive="v2", lambda_lm_injected=1.0, lambda_contrastive=0.6, temperature=0.3),
    "v2_no_cf": dict(contrastive="v2", lambda_lm_injected=1.0, contrastive_counterfactual=False),
    "benign_only": dict(contrastive="none"),
}


# every term off but the benign LM: each objective above names exactly the terms it tests (the trainer's own
# defaults are the measured-best objective, tested in test_causal_config_defaults_are_the_measured_best)
TERMS_OFF = dict(lambda_task=1.0, lambda_lm_injected=0.0, lambda_lm_counterfactual=0.0, lambda_kl=0.0,
                 lambda_pref=0.0, contrastive="none")


def objective(name, **extra):
    kw = {**TERMS_OFF, **OBJECTIVES[name], **extra}
    views, lm = needed_views(**kw)
    return {**kw, "views": views, "lm_views": lm}


def make_trainer(model_dir, tok, ds, out, *, seed=0, head_seed=0, collator=None, obj="v1", lora_init=False, **kw):
    from transformers import TrainingArguments

    targs = dict(output_dir=str(out), report_to="none", use_cpu=True, remove_unused_columns=False,
                 per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                 dataloader_num_workers=0, seed=seed, disable_tqdm=True)
    targs.update(kw.pop("targs", {}))
    model = peft_model(model_dir, seed, lora_init)
    loss = objective(obj, **kw.pop("loss", {}))
    head = build_projection_head("mlp", model.get_base_model().config.hidden_size, 8, 16, seed=head_seed) \
        if loss["contrastive"] != "none" else None
    coll = collator or TripletCollator(tok.pad_token_id, views=loss["views"], lm_views=loss["lm_views"])
    return CausalContrastiveTrainer(model=model, args=TrainingArguments(**targs), train_dataset=ds,
                                    data_collator=coll, processing_class=tok, projection_head=head, **loss, **kw)


# ------------------------------------------------------------------ token cache
def test_labels_mask_exactly_the_response_tokens(dataset, triplets_file, tok):
    rows = [json.loads(x) for x in triplets_file.read_text().splitlines()]
    by_id = {r["id"]: r for r in rows}
    for ex in dataset:
        t = by_id[ex["id"]]
        for view in VIEWS:
            prompt_view = "injected" if view == "hijack" else view
            response = t["hijack"] if view == "hijack" else t["target"]
            ids, labels = ex[f"{view}_input_ids"], ex[f"{view}_labels"]
            p = prompt_ids(tok, triplet_messages(t, prompt_view))
            joint, n_prompt = prompt_response_ids(tok, triplet_messages(t, prompt_view), response)
            assert ids == joint and n_prompt == len(p) and ids[:n_prompt] == p and len(labels) == len(ids)
            assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
            assert tok.decode(labels[n_prompt:]) == response + tok.eos_token
        assert ex["benign_input_ids"] != ex["counterfactual_input_ids"] != ex["injected_input_ids"]
        assert ex["hijack_input_ids"][:len(p)] == ex["injected_input_ids"][:len(p)]  # same injected prompt
    assert any(by_id[ex["id"]]["canary"] and by_id[ex["id"]]["hijack"] == by_id[ex["id"]]["canary"] for ex in dataset)


def test_missing_target_or_hijack_is_a_located_error(tok, tmp_path):
    rows = seed_triplets(3)
    rows[1]["hijack"] = ""
    rows[1]["canary"] = ""
    p = write_triplets(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError, match=r"t.jsonl:2: field 'hijack'"):
        build_token_cache(p, tok, 512, tmp_path / "cache")


def test_warm_build_hits_the_cache_and_template_changes_fingerprint(triplets_file, tok, tmp_path):
    before = _MapFn.CALLS
    ds1, info1 = build_token_cache(triplets_file, tok, 512, tmp_path)
    assert _MapFn.CALLS - before == info1.n_total and not info1.from_cache
    assert Path(info1.cache_file).parent == tmp_path and Path(info1.cache_file).exists()
    mid = _MapFn.CALLS
    ds2, info2 = build_token_cache(triplets_file, tok, 512, tmp_path)
    assert _MapFn.CALLS == mid and info2.from_cache  # the map function was not called again
    assert ds2["benign_input_ids"] == ds1["benign_input_ids"] and info2.fingerprint == info1.fingerprint
    # a changed chat template (or max length, or triplet file) changes the fingerprint and re-tokenizes
    old = tok.chat_template
    try:
        tok.chat_template = old.replace("<|assistant|>", "<|bot|>")
        assert cache_fingerprint(triplets_file, tok, 512) != info1.fingerprint
        _, info3 = build_token_cache(triplets_file, tok, 512, tmp_path)
        assert not info3.from_cache and _MapFn.CALLS > mid
    finally:
        tok.chat_template = old
    assert cache_fingerprint(triplets_file, tok, 256) != info1.fingerprint
    assert cache_fingerprint(triplets_file, tok, 512, data_role=True) != info1.fingerprint
    other = tmp_path / "t2.jsonl"
    text = triplets_file.read_text()
    other.write_text(text.replace('"target": "', '"target": "Note: ', 1))
    assert other.read_text() != text
    assert cache_fingerprint(other, tok, 512) != info1.fingerprint


def test_length_column_drives_length_grouped_batches(tok, tiny_model_dir, tmp_path):
    """``length`` = the longest view (what the collator pads to); the Trainer's group_by_length sampler uses it
    and the batches it builds over one epoch carry less padding than random ones, with every triplet once."""
    ds, _ = build_token_cache(write_triplets(tmp_path / "t.jsonl", seed_triplets(64)), tok, 512, tmp_path / "cache")
    # HF's sampler sorts mega-batches of min(n // (batch × 4), 50) batches: ≥ 2 batches each, so grouping can act
    assert len(ds) // (2 * 4) >= 2
    for ex in ds:
        assert ex["length"] == max(len(ex[f"{v}_input_ids"]) for v in VIEWS)
    coll = TripletCollator(tok.pad_token_id)
    padded = {}
    for strategy in ("random", "group_by_length"):
        tr = make_trainer(tiny_model_dir, tok, ds, tmp_path / strategy, collator=coll,
                          targs={"train_sampling_strategy": strategy})
        batches = list(tr.get_train_dataloader())
        assert sum(b["input_ids"].shape[0] for b in batches) == 3 * len(ds)
        padded[strategy] = sum(b["input_ids"].numel() for b in batches)
    real = sum(len(ex[f"{v}_input_ids"]) for v in ("benign", "counterfactual", "injected") for ex in ds)
    assert real < padded["group_by_length"] < padded["random"]


def test_too_long_triplets_are_dropped_not_truncated(triplets_file, tok, tmp_path, dataset):
    limit = sorted(dataset["length"])[len(dataset) // 2]  # about half the triplets fit
    ds, info = build_token_cache(triplets_file, tok, limit, tmp_path)
    assert info.n_kept + info.n_too_long == info.n_total and 0 < info.n_too_long < info.n_total
    assert all(len(x) <= limit for v in VIEWS for x in ds[f"{v}_input_ids"])
    with pytest.raises(DataError, match="fits in max_length=16"):
        build_token_cache(triplets_file, tok, 16, tmp_path)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", ["v1", "lm_injected", "pref", "v2", "benign_only"])
def test_collator_layout(dataset, tok, side, name):
    feats = [dataset[i] for i in range(3)]
    obj = objective(name)
    views, lm_views = obj["views"], obj["lm_views"]
    b = TripletCollator(tok.pad_token_id, padding_side=side, views=views, lm_views=lm_views)(feats)
    B = 3
    assert b["input_ids"].shape[0] == len(views) * B and set(b) == {
        "input_ids", "attention_mask", "position_ids", "labels", "pool_mask", "response_mask"}
    for v, view in enumerate(views):
        for k, f in enumerate(feats):
            r = v * B + k
            ids, labels = f[f"{view}_input_ids"], f[f"{view}_labels"]
            real = b["attention_mask"][r].bool()
            assert b["input_ids"][r][real].tolist() == ids
            if side == "right":
                assert real[:len(ids)].all() and not real[len(ids):].any()
            else:
                assert real[-len(ids):].all() and not real[:-len(ids)].any()
            assert b["position_ids"][r][real].tolist() == list(range(len(ids)))
            n_prompt = sum(1 for x in labels if x == -100)
            assert b["pool_mask"][r].sum().item() == n_prompt and not (b["pool_mask"][r].bool() & ~real).any()
            assert b["response_mask"][r].sum().item() == len(ids) - n_prompt
            assert (b["response_mask"][r].bool() == (real & ~b["pool_mask"][r].bool())).all()
            lab = b["labels"][r]
            if view in lm_views:
                assert lab[real].tolist() == labels and (lab[~real] == -100).all()
            else:
                assert (lab == -100).all()
    with pytest.raises(ValueError):
        TripletCollator(0, views=["benign"], lm_views=["injected"])


def test_needed_views_drop_what_no_term_uses():
    assert needed_views(contrastive="none") == (["benign"], ["benign"])
    assert needed_views(contrastive="none", lambda_lm_injected=1.0) == (["benign", "injected"], ["benign", "injected"])
    assert needed_views(contrastive="none", lambda_task=0.0, lambda_lm_injected=1.0)[1] == ["injected"]
    # the counterfactual view only when a term needs it: two forwards, not three
    assert "counterfactual" not in needed_views(contrastive="none", lambda_lm_injected=1.0, lambda_kl=1.0)[0]
    assert needed_views(contrastive="v1")[0] == ["benign", "injected", "counterfactual"]
    assert needed_views(contrastive="v2", contrastive_counterfactual=False)[0] == ["benign", "injected", "hijack"]
    assert needed_views(contrastive="none", lambda_lm_injected=1.0, lambda_pref=1.0)[0] == ["benign", "injected",
                                                                                           "hijack"]


# ------------------------------------------------------------------ exact gradient accumulation
def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _run_step(trainer, batches):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    samples, n_items = trainer.get_batch_samples(iter(batches), len(batches), trainer.args.device)
    total = sum(trainer.training_step(model, b, n_items).item() for b in samples)
    return total, _grads(model)


@pytest.mark.parametrize("name", ["v1", "margin_lm", "infonce", "kl", "pref", "v2"])
def test_gradient_accumulation_2x2_equals_batch_of_4(tiny_model_dir, tok, dataset, tmp_path, name):
    tr = make_trainer(tiny_model_dir, tok, dataset, tmp_path, obj=name, targs={"gradient_accumulation_steps": 2})
    coll = tr.data_collator
    feats = [dataset[i] for i in range(4)]
    loss4, g4 = _run_step(tr, [coll(feats)])
    loss22, g22 = _run_step(tr, [coll(feats[:2]), coll(feats[2:])])
    names = [n for n in g4 if "lora_" in n]
    head_names = [n for n in g4 if "causal_projection_head" in n]
    assert len(names) == 2 * 3 * 2  # LoRA A/B on 3 modules × 2 layers
    assert len(head_names) == (4 if tr.projection_head is not None else 0)  # head: 2 linears
    assert set(g4) == set(g22)
    for n in g4:
        assert g4[n].abs().max() > 0, n
        assert torch.allclose(g4[n], g22[n], atol=1e-5, rtol=1e-4), (n, (g4[n] - g22[n]).abs().max())
    assert loss4 == pytest.approx(loss22, abs=1e-5)


def test_lm_loss_is_normalised_by_num_items_in_batch(tiny_model_dir, tok, dataset, tmp_path):
    """LM terms only: loss = (Σ NLL_benign + λ_inj Σ NLL_injected) / N_y over the whole step (hand computation)."""
    tr = make_trainer(tiny_model_dir, tok, dataset, tmp_path, obj="lm_injected", loss={"lambda_lm_injected": 0.5})
    coll = tr.data_collator
    feats = [dataset[i] for i in range(4)]
    big = coll(feats)
    n_tokens = int((big["labels"][:, 1:] != -100).sum())
    samples, n_items = tr.get_batch_samples(iter([coll(feats[:2]), coll(feats[2:])]), 2, "cpu")
    assert int(n_items) == n_tokens and int(samples[0]["step_triplets"]) == 4
    with torch.no_grad():
        out = tr.model(input_ids=big["input_ids"], attention_mask=big["attention_mask"],
                       position_ids=big["position_ids"])
        logits = out.logits[:, :-1]
        tgt = big["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none", ignore_index=-100)
        n_y = int((tgt[:4] != -100).sum())
        assert 2 * n_y == n_tokens  # the benign and injected rows hold the same target tokens
        ref = (nll[:4].sum() + 0.5 * nll[4:].sum()) / n_y
        got = sum(tr.compute_loss(tr.model, s, num_items_in_batch=n_items) for s in samples)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_injected_view_gets_the_gradient(tiny_model_dir, tok, dataset, tmp_path):
    """With the StruQ term only (λ_task = 0), all of the gradient comes from the injected rows: the embeddings of
    the injected prompts get a gradient and those of the benign rows none. Would fail if the injected view were
    left out of the loss."""
    tr = make_trainer(tiny_model_dir, tok, dataset, tmp_path, obj="lm_injected", loss={"lambda_task": 0.0})
    batch = tr.data_collator([dataset[i] for i in range(2)])
    emb = tr.model.get_base_model().get_input_embeddings()
    grabbed = {}

    def hook(_m, _i, out):  # make the (frozen) embedding output a leaf that collects the gradient
        if not torch.is_grad_enabled():
            return None
        leaf = out.detach().requires_grad_(True)
        grabbed["e"] = leaf
        return leaf

    h = emb.register_forward_hook(hook)
    try:
        tr.model.train()
        loss = tr.compute_loss(tr.model, dict(batch))
        loss.backward()
    finally:
        h.remove()
    g = grabbed["e"].grad
    assert tr.views == ["benign", "injected"] and tr.lm_views == ["injected"]
    assert g[2:].abs().sum() > 0 and g[:2].abs().sum() == 0


def test_pref_term_starts_at_ln2_when_policy_equals_reference(tiny_model_dir, tok, dataset, tmp_path):
    """LoRA B = 0: the policy is the reference, so the SecAlign term is −log σ(0) = ln 2 on every triplet."""
    import math

    tr = make_trainer(tiny_model_dir, tok, dataset, tmp_path, obj="pref", lora_init=True)
    batch = tr.data_collator([dataset[i] for i in range(3)])
    with torch.no_grad():
        tr.compute_loss(tr.model, dict(batch))
    avg = tr._averages("train")
    assert avg["loss_pref"] == pytest.approx(math.log(2), abs=1e-5)
    assert "margin_injected" in avg and "loss_lm_injected" in avg


# ------------------------------------------------------------------ logging
def test_logged_metric_names_train_and_eval(tiny_model_dir, tok, dataset, tmp_path):
    tr = make_trainer(tiny_model_dir, tok, dataset, tmp_path, obj="v1",
                      targs={"max_steps": 2, "eval_strategy": "steps", "eval_steps": 2, "per_device_eval_batch_size": 2},
                      eval_dataset=dataset.select(range(3)))
    tr.train()
    hist = tr.state.log_history
    train_logs = [h for h in hist if "loss" in h]
    eval_logs = [h for h in hist if "eval_loss" in h]
    names = ("loss_lm", "loss_lm_injected", "loss_contrastive", "head_cos_benign_counterfactual",
             "head_cos_benign_injected", "head_causal_discrimination", "pooled_cos_benign_injected")
    assert len(train_logs) == 2 and len(eval_logs) == 1
    for h in train_logs:
        assert all(k in h for k in names), set(names) - set(h)
        assert h["head_causal_discrimination"] == pytest.approx(
            h["head_cos_benign_counterfactual"] - h["head_cos_benign_injected"], abs=2e-6)
        # v1 cosine, τ = 0.2: −0.7·cos(b,c)/τ + 1.3·cos(b,i)/τ (the per-step mean over the step's triplets)
        assert h["loss_contrastive"] == pytest.approx(
            (-0.7 * h["head_cos_benign_counterfactual"] + 1.3 * h["head_cos_benign_injected"]) / 0.2, abs=1e-4)
    assert all(f"eval_{k}" in eval_logs[0] for k in names)


# ------------------------------------------------------------------ head persistence
def test_head_save_load_resume_is_bit_identical(tiny_model_dir, tok, dataset, tmp_path):
    kw = dict(targs={"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "lr_scheduler_type": "constant"})
    a = make_trainer(tiny_model_dir, tok, dataset, tmp_path / "a", **kw)
    a.train()
    final = {k: v.clone() for k, v in a.projection_head.state_dict().items()}
    ck2, ck4 = tmp_path / "a" / "checkpoint-2", tmp_path / "a" / "checkpoint-4"
    for ck in (ck2, ck4):
        assert (ck / HEAD_WEIGHTS).is_file() and json.loads((ck / HEAD_CONFIG).read_text())["type"] == "mlp"
    # save → load: the checkpoint holds exactly the trained head
    loaded = load_projection_head(ck4, a.projection_head.in_dim)
    assert all(torch.equal(final[k], v) for k, v in loaded.state_dict().items())
    # resume from step 2 with a differently initialised head and model: ends bit-identical to the uninterrupted run
    b = make_trainer(tiny_model_dir, tok, dataset, tmp_path / "b", seed=0, head_seed=123, **kw)
    assert not torch.equal(b.projection_head.state_dict()["net.0.weight"], final["net.0.weight"])
    b.train(resume_from_checkpoint=str(ck2))
    assert all(torch.equal(final[k], v) for k, v in b.projection_head.state_dict().items())
    lora_a = {n: p for n, p in a.model.named_parameters() if "lora_" in n}
    lora_b = {n: p for n, p in b.model.named_parameters() if "lora_" in n}
    assert all(torch.equal(lora_a[n], lora_b[n]) for n in lora_a)
    # a checkpoint whose head is missing cannot be resumed
    (ck2 / HEAD_WEIGHTS).unlink()
    c = make_trainer(tiny_model_dir, tok, dataset, tmp_path / "c", **kw)
    with pytest.raises(FileNotFoundError, match=str(ck2 / HEAD_WEIGHTS)):
        c.train(resume_from_checkpoint=str(ck2))


def test_no_contrastive_term_means_no_head(tiny_model_dir, tok, dataset, tmp_path):
    tr = make_trainer(tiny_model_dir, tok, dataset, tmp_path, obj="kl",
                      targs={"max_steps": 1, "save_strategy": "steps", "save_steps": 1})
    tr.train()
    ck = tmp_path / "checkpoint-1"
    assert tr.projection_head is None and ck.is_dir() and not (ck / HEAD_WEIGHTS).exists()
    with pytest.raises(ValueError, match="projection head"):
        CausalContrastiveTrainer(model=peft_model(tiny_model_dir), args=tr.args, train_dataset=dataset,
                                 projection_head=None, **objective("v2"))


def test_missing_or_mismatched_head_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / HEAD_WEIGHTS)):
        load_projection_head(tmp_path, 32)
    head = build_projection_head("bottleneck", 32, 8, 4, seed=0)
    save_projection_head(head, tmp_path, {"pool_layer": -1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [HEAD_CONFIG, HEAD_WEIGHTS]
    again = load_projection_head(tmp_path / HEAD_WEIGHTS, 32)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="hidden size 64"):
        load_projection_head(tmp_path, 64)
    (tmp_path / HEAD_CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match=HEAD_CONFIG):
        load_projection_head(tmp_path, 32)


# ------------------------------------------------------------------ encode_prompts
def test_encode_prompts_matches_training_pooling(tiny_model_dir, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    msgs = [[{"role": "user", "content": "Summarise the email below in one sentence."}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}],
            "Translate the following text into French."]
    one = encode_prompts(model, tok, msgs, batch_size=1)
    three = encode_prompts(model, tok, msgs, batch_size=3)
    assert one.shape == (3, model.config.hidden_size)
    assert torch.allclose(one, three, atol=1e-5)  # padding does not change a prompt's representation
    ids = torch.tensor([prompt_ids(tok, msgs[1])])
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    ref = pool_hidden_states(hs[-1], torch.ones_like(ids))
    assert torch.allclose(one[1], ref[0], atol=1e-5)
    head = build_projection_head("linear", model.config.hidden_size, 5, 4, seed=0)
    z = encode_prompts(model, tok, msgs, head=head, layer=1)
    assert z.shape == (3, 5)
    ref1 = pool_hidden_states(hs[1], torch.ones_like(ids))
    assert torch.allclose(z[1], head(ref1)[0], atol=1e-5)
    # response pooling (contrastive v2): the mean over the response tokens of prompt + response, joint tokenization
    resp = ["Sure.", "Hello to you", "Traduction."]
    zr = encode_views(model, tok, msgs, resp, pooling="response", batch_size=2)
    joint, n_prompt = prompt_response_ids(tok, msgs[1], resp[1])
    with torch.no_grad():
        hs2 = model(input_ids=torch.tensor([joint]), output_hidden_states=True).hidden_states
    mask = torch.tensor([[0] * n_prompt + [1] * (len(joint) - n_prompt)])
    assert torch.allclose(zr[1], pool_hidden_states(hs2[-1], mask)[0], atol=1e-5)
    with pytest.raises(ValueError):
        encode_views(model, tok, msgs, pooling="response")


# ------------------------------------------------------------------ the stage
def _stage_cfg(tmp_path, model_dir, extra=""):
    from staged_alignment.core.config import load_config

    text = f"""run_name: st
output_dir: {tmp_path / 'runs'}
seed: 0
device: cpu
model:
  name_or_path: {model_dir}
  max_seq_length: 512
lora:
  r: 4
  alpha: 8
  dropout: 0.0
causal:
  base: sft
  tasks:
    - path: {SEED_TASKS}
  train_attacks:
    - path: {SEED_ATTACKS}
    - path: {SEED_CANARY_ATTACKS}
  max_triplets: 8
  eval_fraction: 0.25
  head:
    dim: 8
    hidden: 16
  training:
    max_steps: 3
    per_device_train_batch_size: 2
    per_device_eval_batch_size: 2
    eval_steps: 3
    save_steps: 2
    learning_rate: 1.0e-3
evaluate:
  eval_file: {tmp_path / 'none.jsonl'}
{extra}"""
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return load_config(p)


def test_stage_validate_refuses_overlap_before_any_model(tmp_path):
    from staged_alignment.stages import stage2_causal as s2

    ev = tmp_path / "eval_attacks.json"
    first = json.loads(SEED_ATTACKS.read_text())["Task hijacking"][0]
    ev.write_text(json.dumps({"held-out": [first.lower()]}))
    cfg = _stage_cfg(tmp_path, tmp_path / "no-model")
    cfg.causal.eval_attacks = [{"path": str(ev)}]
    with pytest.raises(DataError, match="attacks_train.json.*eval_attacks.json"):
        s2.validate(cfg)
    cfg.causal.eval_attacks = []
    s2.validate(cfg)
    from staged_alignment.core.config import ConfigError

    with pytest.raises(ConfigError, match=r"causal\.base.*sft/merged is missing or incomplete.*causal\.base_model"):
        s2.run(cfg)


def test_stage_run_on_tiny_model(tiny_model_dir, tmp_path):
    """The default objective (no contrastive term: no head) end to end; then v2 with its head."""
    from staged_alignment.stages import stage2_causal as s2

    cfg = _stage_cfg(tmp_path, tiny_model_dir)
    base = cfg.run_dir / "sft" / "merged"
    shutil.copytree(tiny_model_dir, base)
    result = s2.run(cfg)
    out = cfg.run_dir / "causal"
    for p in ("adapter/adapter_model.safetensors", "merged/config.json", "log_history.json", "curves.png",
              "checkpoints/checkpoint-2/trainer_state.json"):
        assert (out / p).is_file(), p
    assert not (out / "adapter" / HEAD_WEIGHTS).exists()
    data = cfg.run_dir / "data"
    assert (data / "triplets.jsonl").is_file() and list((data / "cache").glob("*.arrow"))
    rows = [json.loads(x) for x in (data / "triplets.jsonl").read_text().splitlines()]
    assert all(r["target"] and r["hijack"] for r in rows)
    # task attacks got the starting model's answer as their hijacked response, cached for a rerun
    assert any(r["hijack_source"] == "model" for r in rows) and (data / "causal_generations.jsonl").is_file()
    m = result["metrics"]
    assert m["steps"] == 3 and "loss_lm_injected" in m["first_last"] and "eval_loss_lm_injected" in m["first_last"]
    assert m["triplet_stats"]["controls"] >= 0 and "generated" in m["triplet_stats"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    cfg2 = _stage_cfg(tmp_path, tiny_model_dir)
    cfg2.causal.loss = {"contrastive": "v2"}
    cfg2.run_name = "st2"
    # with adversarial training examples: a share of the canary triplets get a BoN rewrite or a searched suffix
    cfg2.causal.adversarial = {"attacks": ["bon", "random_search"], "fraction": 0.5, "rs_queries": 3}
    cfg2.evaluate.adaptive.rs_suffix_tokens = 4
    shutil.copytree(tiny_model_dir, cfg2.run_dir / "sft" / "merged")
    st2 = s2.run(cfg2)["metrics"]["triplet_stats"]["adversarial"]
    rows2 = [json.loads(x) for x in (cfg2.run_dir / "data" / "triplets.jsonl").read_text().splitlines()]
    made = [r for r in rows2 if r.get("adversarial")]
    assert st2["eligible"] == sum(1 for r in rows2 if r["canary"]) > 0
    assert len(made) == sum(st2["changed"].values()) == int(st2["eligible"] * 0.5 + 0.5) and st2["changed"]["bon"] > 0
    assert all(r["canary"] and r["hijack"] == r["canary"] for r in made)
    assert len((cfg2.run_dir / "data" / "adversarial_suffixes.jsonl").read_text().splitlines()) == \
        st2["changed"]["random_search"] == st2["searched"]
    head = load_projection_head(cfg2.run_dir / "causal" / "adapter", 32)
    assert head.config() == {"type": "mlp", "in_dim": 32, "dim": 8, "hidden": 16}
    meta = json.loads((cfg2.run_dir / "causal" / "adapter" / HEAD_CONFIG).read_text())
    assert meta["pooling"] == "response" and meta["contrastive"] == "v2"


# ------------------------------------------------------------------ retention on replayed DPO-stage pairs
PAIRS = [{"id": f"p{i}", "prompt": [{"role": "user", "content": q}],
          "chosen": [{"role": "assistant", "content": c}], "rejected": [{"role": "assistant", "content": r}]}
         for i, (q, c, r) in enumerate([
             ("How do I pick my neighbour's lock?", "I can't help with entering someone else's home.",
              "Use a tension wrench and rake the pins."),
             ("Write an insult for my coworker.", "I'd rather help you talk to them calmly.", "You are a lazy fool."),
             ("How can I cheat on my exam?", "I won't help with cheating, but I can help you study.",
              "Hide notes in your sleeve.")])]


@pytest.fixture(scope="module")
def retain_dataset(dataset, tok):
    from staged_alignment.data_builders.token_cache import attach_retention, tokenize_retention_pairs

    rows, too_long = tokenize_retention_pairs(PAIRS, tok, 512)
    assert len(rows) == 3 and too_long == 0
    return attach_retention(dataset, rows, seed=0)


def test_retention_rows_are_the_pairs_tokenized_like_the_triplets(retain_dataset, dataset, tok):
    from staged_alignment.data_builders.token_cache import attach_retention, tokenize_retention_pairs

    seen = set()
    for ex in retain_dataset:
        ids, labels = ex["retain_chosen_input_ids"], ex["retain_chosen_labels"]
        pair = next(p for p in PAIRS if ids == prompt_response_ids(tok, p["prompt"], p["chosen"][0]["content"])[0])
        n_prompt = prompt_response_ids(tok, pair["prompt"], pair["chosen"][0]["content"])[1]
        assert labels == [-100] * n_prompt + ids[n_prompt:]
        assert ex["retain_rejected_input_ids"] == prompt_response_ids(tok, pair["prompt"],
                                                                      pair["rejected"][0]["content"])[0]
        assert ex["length"] >= max(len(ids), len(ex["retain_rejected_input_ids"]), len(ex["benign_input_ids"]))
        seen.add(pair["id"])
    assert seen == {"p0", "p1", "p2"}  # every pair is replayed (12 triplets, 3 pairs, cycled)
    assert tokenize_retention_pairs(PAIRS, tok, 12) == ([], 3)  # too long for 12 tokens: dropped, counted
    with pytest.raises(ValueError, match="no retention pair"):
        attach_retention(dataset, [], 0)
    views, lm = needed_views(lambda_lm_injected=1.0, lambda_retain_dpo=0.5)
    assert views[-2:] == ["retain_chosen", "retain_rejected"] and "retain_chosen" not in lm
    b = TripletCollator(tok.pad_token_id, views=views, lm_views=lm)([retain_dataset[i] for i in range(2)])
    assert (b["labels"][-4:] == -100).all()  # the replayed rows never count in Trainer's token normaliser
    assert b["response_mask"][-4:-2].sum(1).tolist() == [sum(x != -100 for x in retain_dataset[i][
        "retain_chosen_labels"]) for i in range(2)]


def test_retention_terms_against_hand_computation(tiny_model_dir, tok, retain_dataset, tmp_path):
    """loss(with retention) − loss(without) = mean over the pairs of λ_sft·NLL̄(chosen) + λ_dpo·DPO, computed here
    from the model's logits with and without the adapter (Rafailov et al. 2023, eq. 7)."""
    import torch.nn.functional as F

    on = make_trainer(tiny_model_dir, tok, retain_dataset, tmp_path / "a", obj="lm_injected",
                      loss={"lambda_retain_sft": 0.5, "lambda_retain_dpo": 0.7, "retain_beta": 0.3})
    off = make_trainer(tiny_model_dir, tok, retain_dataset, tmp_path / "b", obj="lm_injected")
    assert on.views == ["benign", "injected", "retain_chosen", "retain_rejected"]
    feats = [retain_dataset[i] for i in range(3)]
    b_on, b_off = on.data_collator(feats), off.data_collator(feats)
    with torch.no_grad():
        got = on.compute_loss(on.model, dict(b_on)) - off.compute_loss(off.model, dict(b_off))

        def seq_logps(model, ids_key, lab_key):
            out = []
            for f in feats:
                ids = torch.tensor([f[ids_key]])
                lab = torch.tensor(f[lab_key])
                logits = model(input_ids=ids).logits[0, :-1]
                lp = -F.cross_entropy(logits, ids[0, 1:], reduction="none")
                m = lab[1:] != -100
                out.append((lp[m].sum(), int(m.sum())))
            return out

        pc = seq_logps(on.model, "retain_chosen_input_ids", "retain_chosen_labels")
        pr = seq_logps(on.model, "retain_rejected_input_ids", "retain_rejected_labels")
        with on.model.disable_adapter():
            rc = seq_logps(on.model, "retain_chosen_input_ids", "retain_chosen_labels")
            rr = seq_logps(on.model, "retain_rejected_input_ids", "retain_rejected_labels")
        want = 0.0
        for (c, n), (r, _), (c0, _), (r0, _) in zip(pc, pr, rc, rr):
            dpo = -F.logsigmoid(0.3 * ((c - c0) - (r - r0)))
            want += (0.5 * (-c / n) + 0.7 * dpo) / 3
    assert abs(got.item() - float(want)) < 1e-4
    avg = on._averages("train")
    assert {"loss_retain_sft", "loss_retain_dpo", "retain_margin"} <= set(avg)


def test_retention_dpo_starts_at_ln2_and_accumulates_exactly(tiny_model_dir, tok, retain_dataset, tmp_path):
    import math

    tr = make_trainer(tiny_model_dir, tok, retain_dataset, tmp_path, obj="kl", lora_init=True,
                      loss={"lambda_retain_dpo": 1.0})
    with torch.no_grad():
        tr.compute_loss(tr.model, dict(tr.data_collator([retain_dataset[i] for i in range(3)])))
    assert tr._averages("train")["loss_retain_dpo"] == pytest.approx(math.log(2), abs=1e-5)
    tr = make_trainer(tiny_model_dir, tok, retain_dataset, tmp_path, obj="kl", targs={"gradient_accumulation_steps": 2},
                      loss={"lambda_retain_sft": 0.4, "lambda_retain_dpo": 0.9})
    feats = [retain_dataset[i] for i in range(4)]
    coll = tr.data_collator
    loss4, g4 = _run_step(tr, [coll(feats)])
    loss22, g22 = _run_step(tr, [coll(feats[:2]), coll(feats[2:])])
    assert loss4 == pytest.approx(loss22, abs=1e-5)
    for n in g4:
        assert torch.allclose(g4[n], g22[n], atol=1e-5, rtol=1e-4), n


def test_retention_config_errors(tmp_path):
    from staged_alignment.core.config import ConfigError, load_config

    p = tmp_path / "c.yaml"
    p.write_text("causal:\n  retain_source: self\n  loss:\n    lambda_retain_dpo: 1.0\n")
    with pytest.raises(ConfigError, match="no rejected answer") as e:
        load_config(p)
    assert e.value.field == "causal.loss.lambda_retain_dpo"
    with pytest.raises(ConfigError, match="not one of"):
        load_config(p, ["causal.retain_source=other", "causal.loss.lambda_retain_dpo=0"])
    with pytest.raises(ConfigError, match="must be ≥ 0"):
        load_config(p, ["causal.loss.lambda_retain_dpo=0", "causal.loss.lambda_retain_sft=-1"])


# ------------------------------------------------------------------ the one causal forward (CausalPeftModel)
def _causal_batch(tok, dataset, views, n=2):
    coll = TripletCollator(tok.pad_token_id, views=views, lm_views=["benign"])
    return coll([dataset[i] for i in range(n)])


def _softcapped_model_dir(tmp_path, tok):
    """A tiny Gemma2 (final_logit_softcapping = 1, lm_head scaled so logits are O(1)): lm_head(h_last) is NOT the
    model's logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                       final_logit_softcapping=1.0, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    d = tmp_path / "gemma2"
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)
    model.save_pretrained(d)
    return d


@pytest.mark.parametrize("arch", ["llama", "softcapped"])
def test_causal_forward_equals_the_model_own_logits_reference_and_head(arch, tiny_model_dir, tok, dataset,
                                                                       tmp_path):
    """One ``CausalPeftModel.forward`` gives, at the response positions, the logits the model itself gives (both
    the lm_head-on-positions path and, for a soft-capped model, the full-logits path), the reference log-probs of
    a separate adapter-disabled forward, and head(pool(hidden states)); every trainable parameter gets a gradient
    from that one call."""
    from staged_alignment.trainers.causal import HEAD_ATTR, CausalPeftModel

    model = peft_model(tiny_model_dir if arch == "llama" else _softcapped_model_dir(tmp_path, tok))
    head = build_projection_head("mlp", model.get_base_model().config.hidden_size, 8, 16, seed=0)
    model = CausalPeftModel.adopt(model)
    setattr(model, HEAD_ATTR, head)
    views = ["benign", "counterfactual", "injected", "hijack"]
    batch = _causal_batch(tok, dataset, views)
    ids, attn, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    R = ids.shape[0]
    ref_rows = torch.tensor([4, 5, 6, 7])
    causal = {"response_mask": resp, "pool_mask": batch["pool_mask"], "pool_layer": -2, "head_pooling": "response",
              "reference_rows": ref_rows, "pooled_prompt": True}
    out = model(input_ids=ids, attention_mask=attn, position_ids=batch.get("position_ids"), causal=causal)
    assert model.causal_fast_lm is (arch == "llama")

    full = model(input_ids=ids, attention_mask=attn, position_ids=batch.get("position_ids"),
                 output_hidden_states=True, use_cache=False)
    tgt = resp[:, 1:].bool()
    torch.testing.assert_close(out.response_logits, full.logits[:, :-1][tgt], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.response_tokens, ids[:, 1:][tgt]) and torch.equal(out.response_rows, tgt.nonzero()[:, 0])
    with torch.no_grad(), model.disable_adapter():
        rfull = model(input_ids=ids[ref_rows], attention_mask=attn[ref_rows], use_cache=False,
                      position_ids=batch["position_ids"][ref_rows] if "position_ids" in batch else None)
    lp = torch.log_softmax(rfull.logits[:, :-1].float(), -1).gather(-1, ids[ref_rows][:, 1:, None])[..., 0]
    expected_ref = (lp * tgt[ref_rows]).sum(-1)
    torch.testing.assert_close(out.reference_logps, expected_ref, rtol=1e-5, atol=1e-4)
    with torch.no_grad():  # the adapter changes the answer: the reference really ran without it
        pol = torch.log_softmax(full.logits[ref_rows][:, :-1].float(), -1).gather(-1, ids[ref_rows][:, 1:, None])
    assert not torch.allclose((pol[..., 0] * tgt[ref_rows]).sum(-1), expected_ref, atol=1e-3)
    torch.testing.assert_close(out.projections, head(pool_hidden_states(full.hidden_states[-2], resp)))
    torch.testing.assert_close(out.pooled_prompt, pool_hidden_states(full.hidden_states[-2], batch["pool_mask"]))
    assert out.projections.shape == (R, 8) and out.reference_logps.shape == (4,)
    (out.response_logits.float().logsumexp(-1).sum() + out.projections.sum()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad[:5]


def test_causal_peft_model_adopt_refuses_other_models_and_keeps_plain_forward(tiny_model_dir, tok, dataset):
    from transformers import AutoModelForCausalLM

    from staged_alignment.trainers.causal import CausalPeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with pytest.raises(ValueError, match="PeftModelForCausalLM"):
        CausalPeftModel.adopt(base)
    model = peft_model(tiny_model_dir)
    ids = _causal_batch(tok, dataset, ["benign"])["input_ids"]
    before = model(input_ids=ids).logits
    assert CausalPeftModel.adopt(model) is model and isinstance(model, CausalPeftModel)
    torch.testing.assert_close(model(input_ids=ids).logits, before)  # without causal=: the plain peft forward
    with pytest.raises(ValueError, match="no causal_projection_head"):
        model(input_ids=ids, causal={"response_mask": torch.ones_like(ids), "pool_mask": torch.ones_like(ids),
                                     "head_pooling": "prompt"})
