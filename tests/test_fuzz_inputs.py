"""Property-based fuzzing of what a user hands the pipeline: the shipped configs and seed files, mutated.

Each example mutates one shipped config (a value swapped for another type, NaN/inf, a negative or huge number, an
empty or blank string, a list or mapping; or the YAML text itself: truncated, re-encoded, given a duplicate key or
an alias bomb), one row of a shipped seed file, a hostile raw override (YAML 1.1 forms, aliases, tags, deep
nesting), a model folder (a config.json value, truncated or flipped safetensors bytes, a shard index naming a path
outside the folder, a broken tokenizer) or one row of the held-out eval file, and runs ``pipeline.py --dry-run`` in-process. The property:
the run ends within the time and memory bound with exit 0 or 2, never a traceback; exit 2 prints exactly one
``error:`` line; and an exit-0 plan holds no value a stage would refuse later (every stage's TRL/transformers
training arguments and the LoRA config build from it).

Default run: a fixed example budget (``FUZZ_EXAMPLES``, derandomized, so CI is repeatable). ``-m slow`` runs a
longer random search.
"""
from __future__ import annotations

import contextlib
import io
import json
import resource
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import REPO, write_tiny_pipeline_config

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))
SEED_FILES = sorted(p for p in (REPO / "data_builders" / "seed").iterdir() if p.suffix in {".jsonl", ".json"})
TIME_BOUND_S = 30.0
RSS_BOUND_KB = 6 * 1024 * 1024  # the whole pytest process, after any example
FUZZ_EXAMPLES = 80

VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10), st.integers(-(10 ** 30), 10 ** 30),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([float("nan"), float("inf"), -1e300, -1.0, 0.0]),
    st.sampled_from(["", "   ", "3e-4", "16", "abc", "-5", ".nan", "null", "\x00", "../../etc/passwd", "é" * 3]),
    st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.sampled_from(["a", "path", "max_steps"]), st.integers(-3, 3), max_size=2),
)


def _leaves(d, prefix=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield prefix + (k,)
            yield from _leaves(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield prefix + (i,)
            yield from _leaves(v, prefix + (i,))


def _set(d, path, value):
    node = d
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def _dry_run(cfg_path: Path, out_dir: Path, extra=()) -> tuple[int, str]:
    from staged_alignment.stages import pipeline

    err, t0 = io.StringIO(), time.time()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = pipeline.main(["--config", str(cfg_path), "--dry-run", f"output_dir={out_dir}", *extra])
        except SystemExit as e:  # argparse --help and the like; a bad input must return, not exit
            rc = e.code
    took = time.time() - t0
    text = err.getvalue()
    assert "Traceback" not in text, text
    assert rc in (0, 2), f"rc={rc}\n{text}"
    assert took < TIME_BOUND_S, f"{took:.1f} s"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < RSS_BOUND_KB
    if rc == 2:
        errors = [x for x in text.splitlines() if x.startswith("error:")]
        assert len(errors) == 1, text
    return rc, text


def _stages_accept(cfg_path: Path, out_dir: Path, extra=()) -> None:
    """What a stage builds first from the config: its training arguments and the LoRA config."""
    from transformers import TrainingArguments
    from trl import DPOConfig, SFTConfig

    from staged_alignment.core.common import build_training_args
    from staged_alignment.core.config import load_config
    from staged_alignment.core.models import lora_config

    cfg = load_config(cfg_path, [f"output_dir={out_dir}", *extra])
    for cls, sec in ((SFTConfig, "sft"), (DPOConfig, "dpo"), (TrainingArguments, "causal")):
        args = build_training_args(cls, cfg, sec, out_dir / sec)
        assert isinstance(args.learning_rate, float) and args.learning_rate > 0
        assert args.max_steps >= 1 or args.max_steps == -1
    lora_config(cfg.lora)


def _text_mutation(text: str, kind: str, at: float) -> str | bytes:
    if kind == "truncate":
        return text[: int(len(text) * at)]
    if kind == "latin1":
        return (text + "\n# caf").encode("utf-8") + b"\xe9\n"  # one Latin-1 byte: not UTF-8
    if kind == "duplicate":
        first = text.splitlines()[0]
        return first + "\n" + text
    if kind == "bomb":
        rows = ["x0: &x0 [a, a, a, a, a, a, a, a, a]"]
        rows += [f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, 9)]
        return text + "\n" + "\n".join(rows) + "\n"
    if kind == "recursive":
        return text + "\nloop: &loop [*loop]\n"
    return text


# raw right-hand sides of a key=value override, as a shell would pass them
RAW_OVERRIDES = st.one_of(
    st.text(alphabet="[]{}:,&*!|>#'\"%@`-? 0aZ\n\t\\", max_size=24),
    st.sampled_from(["1:30", "010", "0o17", "0x1f", "off", "yes", "~", "2026-12-01", ".inf", "-.nan", "1e-4",
                     "&a [*a]", "!!python/object:os.system [ls]", "{a: &a [x, x], b: [*a, *a]}",
                     "[" * 100 + "]" * 100, "/x/good #c.jsonl", "\udcff", "a" * 5000]),
)


def _model_variant(tiny: Path, work: Path, data) -> Path:
    """A copy of the tiny model folder with one thing broken: a config.json value, the weights' bytes, an index."""
    import shutil

    d = work / "model"
    shutil.copytree(tiny, d)
    kind = data.draw(st.sampled_from(["config_value", "weights_bytes", "index", "tokenizer"]), label="model part")
    if kind == "config_value":
        c = json.loads((d / "config.json").read_text())
        key = data.draw(st.sampled_from(sorted(c)), label="config key")
        c[key] = data.draw(st.one_of(VALUES, st.integers(10 ** 5, 10 ** 12)), label="config value")
        (d / "config.json").write_text(json.dumps(c, allow_nan=True))
    elif kind == "weights_bytes":
        w = (d / "model.safetensors").read_bytes()
        cut = data.draw(st.integers(0, min(len(w), 4096)), label="cut")
        flip = data.draw(st.integers(0, 15), label="flipped header byte")
        w = bytearray(w[:cut] if data.draw(st.booleans(), label="truncate") else w)
        if len(w) > flip:
            w[flip] ^= 0xFF
        (d / "model.safetensors").write_bytes(bytes(w))
    elif kind == "index":
        shard = data.draw(st.sampled_from(["model.safetensors", "../model.safetensors", "/etc/passwd", "",
                                           "missing.safetensors", "sub/x.safetensors"]), label="shard")
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    else:
        (d / "tokenizer.json").write_text(data.draw(st.sampled_from(["", "{", "[]", '{"model": 5}']), label="tok"))
    return d


def _eval_variant(work: Path, data) -> Path:
    """The held-out eval file with one row's field replaced."""
    src = REPO / "evaluation" / "heldout" / "injection_heldout.jsonl"
    lines = src.read_text(encoding="utf-8").splitlines()[:20]
    i = data.draw(st.integers(0, len(lines) - 1), label="eval row")
    row = json.loads(lines[i])
    key = data.draw(st.sampled_from(sorted(row) + ["injected_data", "hijack"]), label="eval field")
    row[key] = data.draw(st.one_of(VALUES, st.sampled_from(
        ["that", "the", row.get("data", ""), " " + row.get("data", "") + " ", row.get("instruction", ""),
         "<|assistant|>", "</s>"])), label="eval value")
    lines[i] = json.dumps(row, allow_nan=True)
    out = work / "eval.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def _configs(tiny_model_dir, tmp_path_factory) -> list[tuple[Path, dict]]:
    tmp = tmp_path_factory.mktemp("fuzzcfg")
    tiny = write_tiny_pipeline_config(tmp, tiny_model_dir, name="fz")
    out = [(tiny, yaml.safe_load(tiny.read_text()))]
    for p in SHIPPED:
        data = yaml.safe_load(p.read_text())
        if "shared-data" in p.name and not (REPO.parent / "shared" / "data").is_dir():
            continue  # its inputs are not here (CI=true requires them: conftest)
        out.append((p, data))
    return out


def _fuzz(tiny_model_dir, tmp_path_factory, monkeypatch, data):
    monkeypatch.chdir(REPO)  # the shipped configs' relative paths
    configs = _configs(tiny_model_dir, tmp_path_factory)
    src, base = data.draw(st.sampled_from(configs), label="config")
    work = tmp_path_factory.mktemp("fz")
    target = work / src.name
    mode = data.draw(st.sampled_from(["value", "value", "override", "raw_override", "text", "seed", "model",
                                      "eval"]), label="mode")
    extra = []
    if mode == "raw_override":  # a hostile YAML text on the command line
        target.write_text(src.read_text())
        path = data.draw(st.sampled_from([k for k in _leaves(base) if k != ("output_dir",)]), label="key")
        extra = [".".join(str(p) for p in path) + "=" + data.draw(RAW_OVERRIDES, label="raw")]
    elif mode == "model":
        target.write_text(src.read_text())
        extra = [f"model.name_or_path={json.dumps(str(_model_variant(tiny_model_dir, work, data)))}"]
    elif mode == "eval":
        target.write_text(src.read_text())
        extra = [f"evaluate.eval_file={json.dumps(str(_eval_variant(work, data)))}"]
    elif mode == "override":  # the same mutation given as key=value on the command line
        target.write_text(src.read_text())
        path = data.draw(st.sampled_from([k for k in _leaves(base) if k != ("output_dir",)]), label="key")
        value = data.draw(VALUES, label="value")
        raw = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
        raw = raw.removesuffix("\n...").strip() if not isinstance(value, str) else raw
        extra = [".".join(str(p) for p in path) + "=" + raw]
    elif mode == "value":
        cfg = json.loads(json.dumps(base))
        path = data.draw(st.sampled_from(list(_leaves(cfg))), label="key")
        _set(cfg, path, data.draw(VALUES, label="value"))
        target.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    elif mode == "text":
        kind = data.draw(st.sampled_from(["truncate", "latin1", "duplicate", "bomb", "recursive"]), label="text")
        new = _text_mutation(src.read_text(), kind, data.draw(st.floats(0, 1), label="at"))
        (target.write_bytes if isinstance(new, bytes) else target.write_text)(new)
    else:
        seed = data.draw(st.sampled_from(SEED_FILES), label="seed file")
        lines = seed.read_text(encoding="utf-8").splitlines()
        kind = data.draw(st.sampled_from(["row", "truncate", "latin1"]), label="seed mutation")
        mutated = work / seed.name
        if kind == "truncate":
            mutated.write_text("\n".join(lines)[: data.draw(st.integers(0, 4000), label="cut")])
        elif kind == "latin1":
            mutated.write_bytes(("\n".join(lines) + "\n").encode("utf-8") + "é\n".encode("latin-1"))
        elif seed.suffix == ".jsonl":
            i = data.draw(st.integers(0, len(lines) - 1), label="row")
            row = json.loads(lines[i])
            key = data.draw(st.sampled_from(sorted(row)), label="field")
            row[key] = data.draw(VALUES, label="value")
            lines[i] = json.dumps(row, allow_nan=True)
            mutated.write_text("\n".join(lines) + "\n")
        else:
            obj = json.loads(seed.read_text())
            leaves = [p for p in _leaves(obj)] or [()]
            p = data.draw(st.sampled_from(leaves), label="where")
            if p:
                _set(obj, p, data.draw(VALUES, label="value"))
            mutated.write_text(json.dumps(obj, allow_nan=True))
        text = src.read_text().replace(str(seed.relative_to(REPO)), str(mutated)).replace(str(seed), str(mutated))
        target.write_text(text)
    rc, _ = _dry_run(target, work / "runs", extra)
    if rc == 0:
        _stages_accept(target, work / "runs", extra)


FAST = settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LONG = settings(max_examples=1500, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FAST
@given(data=st.data())
def test_fuzzed_inputs_end_in_a_plan_or_one_error(tiny_model_dir, tmp_path_factory, monkeypatch, data):
    _fuzz(tiny_model_dir, tmp_path_factory, monkeypatch, data)


@pytest.mark.slow
@LONG
@given(data=st.data())
def test_fuzzed_inputs_long_run(tiny_model_dir, tmp_path_factory, monkeypatch, data):
    _fuzz(tiny_model_dir, tmp_path_factory, monkeypatch, data)
