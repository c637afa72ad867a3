"""Cost of the adaptive attacks, as ratios of the model's own forward time (so GPU budgets can be stated honestly).

Model: the embedded SmolLM2-135M-Instruct, fp32, the run's Zephyr template; prompt: a held-out case with
StruQ's naive injection and a suffix after it (``evaluation.adaptive.prepare``), target the canary.

Sides, interleaved (A B C … per round), medians:

* ``fwd_bwd``: one forward + backward of the whole sequence (prefix + suffix + post + target): the gradient part
  of a GCG step, measured on its own;
* ``cands_cached``: the target loss of ``B`` candidates at the prefix's KV cache (mini-batches of ``M``), the
  other part of a GCG step;
* ``cands_full``: the same ``B`` losses with the whole sequence run per candidate (no cache): what the cache saves;
* ``gcg_step``: :func:`evaluation.adaptive.gcg_step` (gradient, top-k, candidates, round-trip filter, cached
  losses, argmin);
* ``rs_query``: one random-search query (one candidate's loss at the cache);
* ``forward``: one forward of the whole sequence (no grad).

Headline: ``gcg_step / (fwd_bwd + cands_cached)`` — the step's overhead over its two necessary parts (goal ≤ 1.3);
also ``cands_full / cands_cached`` (the cache's speed-up) and ``rs_query / forward``.

    python bench/bench_attacks.py [--batch 64] [--mini-batch 64] [--suffix 20] [--reps 3] [--threads 1] [--quick]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, interleave, median, report, setup, smollm2_path, timed

GOAL = 1.3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--mini-batch", type=int, default=64)
    ap.add_argument("--suffix", type=int, default=20)
    ap.add_argument("--topk", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.mini_batch, args.reps = 16, 16, 1
    setup(args.threads)
    import torch
    from transformers import AutoModelForCausalLM

    from staged_alignment.core.config import ModelSection
    from staged_alignment.core.models import load_tokenizer
    from staged_alignment.evaluation import adaptive as AD
    from staged_alignment.evaluation.cases import load_cases

    path = smollm2_path()
    tok = load_tokenizer(path, ModelSection())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    case = next(c for c in load_cases(ROOT / "evaluation/heldout/injection_heldout.jsonl", controls=False)
                if c["position"] == "end")
    prep = AD.prepare(tok, case)
    suffix = AD.init_suffix(tok, args.suffix)
    allowed = AD.allowed_tokens(tok)
    mask = torch.zeros(model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
    mask[allowed] = True
    cache = AD.prefix_cache(model, prep.prefix_ids)
    g = torch.Generator().manual_seed(0)
    cands = torch.tensor(allowed)[torch.randint(0, len(allowed), (args.batch, args.suffix), generator=g)]
    full_ids = torch.tensor([prep.prefix_ids + suffix.tolist() + prep.post_ids + prep.target_ids])

    def forward():
        with torch.no_grad():
            model(input_ids=full_ids)

    sides = {
        "fwd_bwd": timed(lambda: AD.token_gradients(model, prep, suffix)),
        "cands_cached": timed(lambda: AD.candidate_losses(model, prep, cands, cache=cache,
                                                          mini_batch=args.mini_batch)),
        "cands_full": timed(lambda: AD.candidate_losses(model, prep, cands, cache=None, mini_batch=args.mini_batch)),
        "gcg_step": timed(lambda: AD.gcg_step(model, tok, prep, suffix, mask, topk=args.topk, batch=args.batch,
                                              mini_batch=args.mini_batch, rng=g, cache=cache)),
        "rs_query": timed(lambda: AD.candidate_losses(model, prep, cands[:1], cache=cache)),
        "forward": timed(forward),
    }
    t = {k: median(v) for k, v in interleave(sides, args.reps).items()}
    ratio = t["gcg_step"] / (t["fwd_bwd"] + t["cands_cached"])
    figures = {**{f"{k}_s": round(v, 4) for k, v in t.items()},
               "prompt_tokens": len(prep.prefix_ids) + args.suffix + len(prep.post_ids) + len(prep.target_ids),
               "prefix_tokens": len(prep.prefix_ids), "batch": args.batch, "mini_batch": args.mini_batch,
               "suffix_tokens": args.suffix, "topk": args.topk,
               "cache_speedup_full_over_cached": round(t["cands_full"] / t["cands_cached"], 3),
               "rs_query_over_forward": round(t["rs_query"] / t["forward"], 3),
               "gcg_step_over_fwd_bwd": round(t["gcg_step"] / t["fwd_bwd"], 3)}
    report("attacks", figures, headline="gcg_step / (fwd_bwd + cached candidate forwards)", value=ratio,
           goal=f"≤ {GOAL}", met=ratio <= GOAL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
