"""The eval's item-level answer cache (evals/item_cache.py) on lm-eval's own request objects: a batch's answers come
back only for exactly that batch (same items, same order, same pixels, same settings), survive a torn last line, and
a --force attempt reads only its own. The kill-and-rerun and `harness eval` checks on real runs are in test_kill.py."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import property_settings
from hypothesis import given
from hypothesis import strategies as st
from lm_eval.api.instance import Instance
from PIL import Image

from evals.item_cache import ItemCache, Location, model_digest, parse_name, request_digest, settings_key
from runtime.errors import UserError

GEN = {"until": ["\n"], "do_sample": False, "max_gen_toks": 8}


def _request(context: str, pixel: int = 0, gen: dict | None = None) -> Instance:
    image = Image.new("RGB", (4, 4), (pixel, 0, 0))
    return Instance(request_type="generate_until", doc={}, arguments=(context, gen or GEN, {"visual": [image]}),
                    idx=0)


def test_a_batch_is_found_only_as_it_was_generated(tmp_path):
    key = settings_key({"model": "m", "batch_size": 2})
    batch = [_request("what colour?"), _request("how many?")]
    ItemCache(Location(str(tmp_path)), key, shard=0).put(batch, ["red", "2"])
    again = ItemCache(Location(str(tmp_path)), key, shard=1)  # another shard reads it: batches are shard-independent
    assert again.get([_request("what colour?"), _request("how many?")]) == ["red", "2"]
    assert again.get(list(reversed(batch))) is None  # another order: other padding, maybe other answers
    assert again.get(batch[:1]) is None  # another batch
    assert again.get([_request("what colour?", pixel=1), batch[1]]) is None  # one pixel changed
    assert again.get([_request("what colour?", gen={**GEN, "max_gen_toks": 9}), batch[1]]) is None
    other = ItemCache(Location(str(tmp_path)), settings_key({"model": "m", "batch_size": 3}), shard=0)
    assert other.get(batch) is None  # another key: another model, batch size, protocol...


def test_a_torn_last_line_costs_only_its_batch(tmp_path):
    key, first, second = "k" * 32, [_request("a")], [_request("b")]
    cache = ItemCache(Location(str(tmp_path)), key, shard=0)
    cache.put(first, ["x"])
    cache.put(second, ["y"])
    text = cache.path.read_text()
    cache.path.write_text(text[: len(text) - 10])  # a kill tore the last write
    again = ItemCache(Location(str(tmp_path)), key, shard=0)
    assert again.get(first) == ["x"] and again.get(second) is None and again.damaged == 1


def test_a_forced_attempt_reads_only_its_own_answers_and_leaves_them_to_plain_runs(tmp_path):
    key, batch = "k" * 32, [_request("a")]
    ItemCache(Location(str(tmp_path)), key, 0).put(batch, ["plain"])
    forced = ItemCache(Location(str(tmp_path), "20261207-120000-sft-abcdef"), key, 0)
    assert forced.get(batch) is None
    forced.put(batch, ["forced"])
    assert ItemCache(Location(str(tmp_path), "20261207-120000-sft-abcdef"), key, 0).get(batch) == ["forced"]
    assert ItemCache(Location(str(tmp_path)), key, 0).get(batch) in (["plain"], ["forced"])
    assert {parse_name(p.name)[1] for p in tmp_path.iterdir()} == {"shared", "20261207-120000-sft-abcdef"}


@property_settings(100)
@given(st.lists(st.tuples(st.text(max_size=30), st.integers(0, 255)), min_size=1, max_size=6, unique=True),
       st.lists(st.text(max_size=20), min_size=6, max_size=6))
def test_answers_come_back_exactly(tmp_path_factory, items, answers):
    directory = tmp_path_factory.mktemp("cache")
    batch = [_request(context, pixel) for context, pixel in items]
    ItemCache(Location(str(directory)), "k" * 32, 0).put(batch, answers[: len(batch)])
    assert ItemCache(Location(str(directory)), "k" * 32, 0).get(batch) == answers[: len(batch)]
    assert len({request_digest(r.args) for r in batch}) == len(batch)


def test_parse_name_knows_only_the_cache_files():
    assert parse_name(f"{'a' * 32}.shared.shard3.jsonl") == ("a" * 32, "shared", 3)
    assert parse_name("k.my.run.shard0.jsonl") == ("k", "my.run", 0)  # a --force run named my.run
    for name in ("notes.txt", "a.shared.shard.jsonl", "a.shared.shard1.json", "a.shard1.jsonl", ".x.shard1.jsonl"):
        assert parse_name(name) is None, name


def test_the_model_digest_covers_every_file(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "tokenizer.json").write_text("{}")
    before = model_digest(model)
    (model / "tokenizer.json").write_text('{"added": 1}')
    assert model_digest(model) != before
    (model / "tokenizer.json").write_text("{}")
    assert model_digest(model) == before
    Path(model / "model.safetensors").rename(model / "other.safetensors")
    assert model_digest(model) != before


def test_an_unwritable_directory_leaves_the_eval_uncached(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    cache = ItemCache(Location(str(blocked / "eval-items")), "k" * 32, 0)
    cache.put([_request("a")], ["x"])  # no exception: the eval goes on
    assert cache.unwritable and "eval-items" in cache.unwritable and cache.get([_request("a")]) == ["x"]


def test_gc_keeps_the_answers_of_kept_runs_and_of_an_interrupted_eval(tmp_path):
    """harness gc's plan over the item cache alone (no stage outputs): a finished run's keys stay while it is kept;
    an interrupted run (no result.json) names no keys, so whatever was written since it began stays for its rerun."""
    import json
    import os

    from harness.gc import plan

    answers = tmp_path / ".cache" / "eval-items"
    answers.mkdir(parents=True)

    def run(name: str, when: float, keys: list[str] | None) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("seed: 0\n")
        if keys is not None:
            stages = [{"name": "eval", "outputs": {"item_cache_keys": keys}}]
            result = {"run_id": name, "pipeline": "sft", "config": {}, "metrics": {}, "manifest": {}, "stages": stages}
            (tmp_path / name / "result.json").write_text(json.dumps(result))
        for path in [tmp_path / name / "config.yaml", tmp_path / name]:
            os.utime(path, (when, when))

    def answer(key: str, when: float) -> None:
        path = answers / f"{key}.shared.shard0.jsonl"
        path.write_text("")
        os.utime(path, (when, when))

    run("old", 1000, ["a"]), answer("a", 1010)
    run("new", 2000, ["b"]), answer("b", 2010)
    (answers / "notes.txt").write_text("not the cache's own")
    assert [p.name for p in plan(tmp_path, keep=1).answers] == ["a.shared.shard0.jsonl"]
    run("cut", 3000, None), answer("c", 3010)  # killed mid-eval: resumes from c
    assert [p.name for p in plan(tmp_path, keep=1).answers] == ["a.shared.shard0.jsonl"]
    assert [p.name for p in plan(tmp_path, keep=2).answers] == []
    stages = [{"name": "eval", "outputs": {"item_cache_keys": 7}}]  # a damaged result stops gc before any delete
    (tmp_path / "new" / "result.json").write_text(json.dumps({"run_id": "new", "pipeline": "sft", "config": {},
                                                              "metrics": {}, "manifest": {}, "stages": stages}))
    with pytest.raises(UserError, match=r"new/result.json.*item_cache_keys"):
        plan(tmp_path, keep=1)
