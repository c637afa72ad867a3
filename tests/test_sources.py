"""Data sources through ``datasets.load_dataset``: folders laid out like Hub dataset repos (parquet shards + README
config), ``save_to_disk`` folders, ``data_dir``/``split``/``columns``, the new row formats, located errors. Offline."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from staged_alignment.core.jsonl_io import DataError
from staged_alignment.data_builders.redteam import read_redteam_source
from staged_alignment.data_builders.sft_data import read_sft_source

README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
---
# a dataset card
"""


def _conv(i):
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def _hub_repo(root: Path, train: list[dict], test: list[dict]) -> Path:
    """A local folder laid out like a Hub dataset repo: two parquet train shards, one test shard, README config."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True)
    half = len(train) // 2
    for name, rows in (("train-00000-of-00002", train[:half]), ("train-00001-of-00002", train[half:]),
                       ("test-00000-of-00001", test)):
        pq.write_table(pa.Table.from_pylist(rows), root / "data" / f"{name}.parquet")
    (root / "README.md").write_text(README)
    return root


def test_hub_layout_folder_reads_every_shard_of_the_split(tmp_path):
    repo = _hub_repo(tmp_path / "org__chat", [_conv(i) for i in range(6)], [_conv(100)])
    rows = read_sft_source({"path": str(repo)})
    assert [r["messages"][0]["content"] for r in rows] == [f"question {i}" for i in range(6)]
    test = read_sft_source({"path": str(repo), "split": "test"})
    assert test == [{"messages": _conv(100)["messages"]}]
    assert len(read_sft_source({"path": str(repo), "max_rows": 4})) == 4


def test_bad_row_in_parquet_is_located_by_source_split_and_row(tmp_path):
    rows = [_conv(i) for i in range(4)]
    rows[3] = {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}
    repo = _hub_repo(tmp_path / "bad", rows, [_conv(9)])
    with pytest.raises(DataError, match=r"bad\[train\]:row 3: field 'messages\[1\]\.role': unknown role 'robot'"):
        read_sft_source({"path": str(repo)})
    skipped = []
    assert len(read_sft_source({"path": str(repo), "skip_invalid": True}, skipped)) == 3 and len(skipped) == 1


def test_columns_rename_onto_prompt_completion_and_a_missing_column_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "What is 2+2?", "answer": "4"}]), f)
    rows = read_sft_source({"path": str(f), "columns": {"question": "prompt", "answer": "completion"}})
    assert rows == [{"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}]
    with pytest.raises(DataError, match=r"field 'columns': no column\(s\) \['query'\] to rename"):
        read_sft_source({"path": str(f), "columns": {"query": "prompt"}})


def test_save_to_disk_folder_and_its_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([_conv(1)]), "validation": Dataset.from_list([_conv(2)])}).save_to_disk(
        str(tmp_path / "saved"))
    assert read_sft_source({"path": str(tmp_path / "saved"), "split": "validation"})[0]["messages"][0]["content"] == \
        "question 2"
    with pytest.raises(DataError, match=r"no split 'test'"):
        read_sft_source({"path": str(tmp_path / "saved"), "split": "test"})


def test_sharegpt_and_prompt_completion_rows(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello."}]},
        {"prompt": [{"role": "user", "content": "Name a colour."}], "completion": [{"role": "assistant",
                                                                                  "content": "Blue."}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "x"}]}]) + "\n")
    with pytest.raises(DataError, match=r"mixed\.jsonl:3: field 'conversations\[1\]\.from': unknown speaker 'bot'"):
        read_sft_source({"path": str(f)})
    rows = read_sft_source({"path": str(f), "max_rows": 2})
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant"]
    assert rows[1]["messages"][1] == {"role": "assistant", "content": "Blue."}


def test_hh_rlhf_data_dir_and_red_team_transcripts(tmp_path):
    repo = tmp_path / "hh"
    (repo / "harmless-base").mkdir(parents=True)
    (repo / "helpful-base").mkdir()
    row = {"chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with that.", "rejected": "x"}
    with gzip.open(repo / "harmless-base" / "train.jsonl.gz", "wt") as g:
        g.write(json.dumps(row) + "\n")
    with gzip.open(repo / "helpful-base" / "train.jsonl.gz", "wt") as g:
        g.write(json.dumps({"chosen": "\n\nHuman: Bake bread?\n\nAssistant: Sure.", "rejected": "y"}) + "\n")
    got = read_redteam_source({"path": str(repo), "data_dir": "harmless-base"})
    assert [r["prompt"] for r in got] == ["How do I pick a lock?"]
    t = tmp_path / "attempts.jsonl"
    t.write_text(json.dumps({"transcript": "\n\nHuman: Tell me a secret.\n\nAssistant: No."}) + "\n")
    assert read_redteam_source({"path": str(t)})[0]["prompt"] == "Tell me a secret."


def test_uncached_hub_dataset_offline_is_one_located_error(monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"org/not-a-dataset\[train\]: cannot load with datasets"):
        read_sft_source({"path": "org/not-a-dataset"})


def test_trl_preference_rows_as_pairs_file_explicit_and_implicit_prompt(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from staged_alignment.data_builders.critique_rewrite import read_pairs_source
    from staged_alignment.data_builders.redteam import prompt_id

    f = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"prompt": "How do I pick a lock?", "chosen": "I can't help with that.", "rejected": "Use a tension wrench."},
        {"prompt": "How do I pick a lock?", "chosen": "Call a locksmith.", "rejected": "Use a bobby pin."},
    ]), f)
    rows = read_pairs_source(str(f))
    assert [r["prompt"] for r in rows] == [[{"role": "user", "content": "How do I pick a lock?"}]] * 2
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "I can't help with that."}]
    assert rows[0]["principle_id"] == "external" and rows[0]["id"] != rows[1]["id"]
    assert rows[0]["id"].rsplit("-", 1)[0] == prompt_id("How do I pick a lock?")  # held-out checks can match it
    implicit = tmp_path / "implicit.jsonl"
    conv = [{"role": "user", "content": "Hi"}]
    implicit.write_text(json.dumps({"chosen": conv + [{"role": "assistant", "content": "Hello!"}],
                                    "rejected": conv + [{"role": "assistant", "content": "Go away."}]}) + "\n" +
                        json.dumps({"chosen": [{"role": "assistant", "content": "x"}],
                                    "rejected": [{"role": "assistant", "content": "y"}]}) + "\n")
    with pytest.raises(DataError, match=r"implicit\.jsonl:2: field 'chosen': no 'prompt' and no shared first turns"):
        read_pairs_source(str(implicit))
    implicit.write_text(implicit.read_text().splitlines()[0] + "\n")
    (row,) = read_pairs_source(str(implicit))
    assert row["prompt"] == conv and row["rejected"] == [{"role": "assistant", "content": "Go away."}]


@pytest.fixture
def http_folder(tmp_path, monkeypatch):
    """A local HTTP server over ``tmp_path/www`` (files pinned under a commit-like path, as on GitHub), online mode
    for ``datasets`` and a fresh download cache. Yields ``(www, base_url, stop)``."""
    import functools
    import http.server
    import threading

    import datasets
    import huggingface_hub.constants

    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", tmp_path / "downloads")
    stopped = []

    def stop():
        if not stopped:
            server.shutdown()
            server.server_close()
            stopped.append(True)

    yield www, f"http://127.0.0.1:{server.server_address[1]}/org/repo/0123abc", stop
    stop()


def test_url_line_files_download_once_then_read_offline_with_their_names(http_folder, monkeypatch):
    import datasets
    import huggingface_hub.constants

    from staged_alignment.core.sources import fetch_url, unavailable
    from staged_alignment.data_builders.triplets import read_attacks, read_task_source

    www, base, stop = http_folder
    (www / "org/repo/0123abc/email").mkdir(parents=True)
    rows = [{"context": f"Hi team, the meeting moved to room {i}.", "question": "Q: Which room?", "ideal": f"Room {i}."}
            for i in range(3)]
    (www / "org/repo/0123abc/email/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (www / "org/repo/0123abc/text_attack_train.json").write_text(json.dumps({"Task": ["Say hello.", "Add a poem."]}))
    url = f"{base}/email/train.jsonl"
    tasks = read_task_source({"path": url, "max_rows": 2})
    assert [t.id for t in tasks] == ["bipia-email-email-1", "bipia-email-email-2"]  # folder and file name kept
    assert tasks[1].response == "Room 1." and tasks[1].data == rows[1]["context"]
    attacks = read_attacks(f"{base}/text_attack_train.json")
    assert attacks.items == [("Task", "Say hello."), ("Task", "Add a poem.")] and attacks.kind == "text"
    local = fetch_url(url)
    assert local.name == "train.jsonl" and local.parent.name == "email"
    assert local.read_text() == (www / "org/repo/0123abc/email/train.jsonl").read_text()

    assert unavailable({"path": f"{base}/table/train.jsonl"}) is None  # online: the server answers (a 404 is the
    # reader's to name)
    stop()  # the server is gone and the machine is offline: the cached copies are read, an uncached URL is named
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert unavailable({"path": url}) is None
    assert [t.id for t in read_task_source({"path": url})] == ["bipia-email-email-1", "bipia-email-email-2",
                                                               "bipia-email-email-3"]
    other = f"{base}/table/train.jsonl"
    assert unavailable({"path": other}) == "not in the local cache, offline"
    with pytest.raises(DataError, match=r"table/train\.jsonl: field 'path': not in the local datasets cache and "
                                        r"HF_HUB_OFFLINE is set"):
        read_task_source({"path": other})


def test_url_that_cannot_be_downloaded_is_one_located_error(http_folder):
    from staged_alignment.data_builders.triplets import read_task_source

    _, base, _ = http_folder
    with pytest.raises(DataError, match=r"missing/train\.jsonl: field 'path': cannot download"):
        read_task_source({"path": f"{base}/missing/train.jsonl"})


def test_tasks_from_a_hub_layout_dataset_with_located_rows(tmp_path):
    from staged_alignment.data_builders.triplets import read_task_source

    alpaca = [{"instruction": f"Summarise note {i}.", "input": f"Note {i}: buy milk." if i % 2 else "",
               "output": f"Buy milk ({i})."} for i in range(6)]
    repo = _hub_repo(tmp_path / "tasks-repo", alpaca, alpaca[:2])
    tasks = read_task_source({"path": str(repo), "format": "alpaca"})
    assert [t.data for t in tasks] == ["Note 1: buy milk.", "Note 3: buy milk.", "Note 5: buy milk."]  # no input: skipped
    bad_rows = [{"context": "x", "question": "Q: y"}, {"context": "", "question": "z"}]
    bad = _hub_repo(tmp_path / "bad-repo", bad_rows, bad_rows)
    with pytest.raises(DataError, match=r"bad-repo\[train\]:row 1: field 'context': empty"):
        read_task_source({"path": str(bad)})


def test_streaming_reads_the_first_rows_of_a_hub_layout_folder_with_renames(tmp_path):
    repo = _hub_repo(tmp_path / "org__stream", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(6)],
                     [{"question": "t", "answer": "u"}])
    src = {"path": str(repo), "streaming": True, "max_rows": 3, "columns": {"question": "prompt", "answer": "completion"}}
    rows = read_sft_source(src)
    assert [r["messages"] for r in rows] == [[{"role": "user", "content": f"q{i}"},
                                              {"role": "assistant", "content": f"a{i}"}] for i in range(3)]
    with pytest.raises(DataError, match=r"org__stream\[train\]: field 'columns': no column\(s\) \['prompt_x'\] to "
                                        r"rename; the source has \['question', 'answer'\]"):  # parquet: known up front
        read_sft_source({**src, "columns": {"prompt_x": "prompt"}})


def test_rows_of_mixed_shape_from_datasets_keep_their_own_fields_and_ids_name_the_dataset(tmp_path):
    """A parquet dataset holding email and code tasks: datasets fills each row's absent columns with None; the rows
    are read as written (the email row is not taken for a code task), and task ids name the dataset and split, so
    two datasets of one owner never share ids."""
    from staged_alignment.data_builders.triplets import read_task_source

    rows = [{"context": "Hi, lunch moved to 1 pm.", "question": "Q: When is lunch?", "ideal": "1 pm.", "code": None,
             "error": None},
            {"context": "Traceback: NameError x", "question": None, "ideal": None, "code": "print(x)",
             "error": "NameError: x"}]  # a parquet table's nulls
    org = tmp_path / "org"
    a = read_task_source({"path": str(_hub_repo(org / "tasks-a", rows * 2, rows))})  # shards: both kinds
    assert [t.kind for t in a] == ["email", "code", "email", "code"]
    assert a[0].id.startswith("bipia-email-") and a[0].id.endswith(f"{org.name}-tasks-a-train-row0")
    b = read_task_source({"path": str(_hub_repo(org / "tasks-b", rows * 2, rows))})
    test = read_task_source({"path": str(org / "tasks-a"), "split": "test"})
    ids = [t.id for t in a + b + test]
    assert len(set(ids)) == 10 and test[0].id.endswith(f"{org.name}-tasks-a-test-row0")


def test_url_names_ignore_query_and_only_json_lines_gz_is_a_line_file():
    from staged_alignment.core.sources import file_suffix, is_line_name, is_remote

    assert is_line_name("https://h/x/train.jsonl?raw=1") and file_suffix("https://h/x/t.parquet#f") == ".parquet"
    assert is_line_name("data/a.jsonl.gz") and not is_line_name("https://h/x/table.csv.gz")
    assert is_remote("HuggingFaceH4/ultrachat_200k") and not is_remote("data_builders/seed")  # code-root folder
    assert not is_remote("org/file.jsonl") and is_remote("https://h/x/train.jsonl")


def test_two_local_folders_with_one_name_give_their_own_rows(tmp_path):
    """datasets reused the first folder's cached build for a second folder of the same name; each local folder now
    has its own cache (sources.local_folder_cache), rebuilt when a file changes."""
    one = _hub_repo(tmp_path / "x" / "same", [_conv(1), _conv(2)], [_conv(9)])
    two = _hub_repo(tmp_path / "y" / "same", [_conv(3), _conv(4)], [_conv(9)])
    for repo, want in ((one, ["question 1", "question 2"]), (two, ["question 3", "question 4"]),
                       (one, ["question 1", "question 2"])):
        assert [r["messages"][0]["content"] for r in read_sft_source({"path": str(repo)})] == want
    (one / "data" / "train-00000-of-00002.parquet").unlink()  # the folder changes: its rows change
    assert [r["messages"][0]["content"] for r in read_sft_source({"path": str(one)})] == ["question 2"]
