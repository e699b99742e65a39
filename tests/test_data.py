from __future__ import annotations

import json
import math
import random

import pytest

from preftune.core.errors import InputError
from preftune.data import shapes
from preftune.data.rows import Example, load_examples
from preftune.data.split import batch_order, split_by_prompt
from preftune.data.tokenize import tokenize_examples
from preftune.evaluation.stats import length_bias

ROW = {"prompt": "sort: 3 1 =", "chosen": " 1 3", "rejected": " 3 1"}
USER = {"role": "user", "content": "What is 2+2?"}
CONV = {"chosen": [USER, {"role": "assistant", "content": "4"}],
        "rejected": [USER, {"role": "assistant", "content": "5, I think"}]}


def _jsonl(tmp_path, rows, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tok(tiny_world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_world.model_dir)


# --- loading -----------------------------------------------------------------------------------------------

def test_load_jsonl_ids_blank_lines_and_extra_columns(tmp_path):
    path = _jsonl(tmp_path, [ROW, "", {**ROW, "prompt": "sort: 2 1 =", "score": 3}])
    examples = load_examples(path)
    assert [e.id for e in examples] == ["train.jsonl:1", "train.jsonl:3"]
    assert examples[1] == Example("train.jsonl:3", "sort: 2 1 =", " 1 3", " 3 1")


def test_load_json_and_parquet_use_zero_based_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.json").write_text(json.dumps([ROW, ROW]))
    (tmp_path / "b.json").write_text(json.dumps({"test": [ROW], "data": [ROW, ROW]}))
    pq.write_table(pa.Table.from_pylist([CONV, CONV]), tmp_path / "c.parquet")  # messages as structs
    assert [e.id for e in load_examples(str(tmp_path / "a.json"))] == ["a.json:0", "a.json:1"]
    assert len(load_examples(str(tmp_path / "b.json"), split="test")) == 1
    assert len(load_examples(str(tmp_path / "b.json"), split="train")) == 2
    rows = load_examples(str(tmp_path / "c.parquet"))
    assert [e.id for e in rows] == ["c.parquet:0", "c.parquet:1"] and rows[1].prompt == [USER]


def test_load_dataset_folders(tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "files").mkdir()
    pq.write_table(pa.Table.from_pylist([ROW] * 3), tmp_path / "files" / "test.parquet")
    assert [e.id for e in load_examples(str(tmp_path / "files"), split="test")][-1] == "files:2"
    datasets.Dataset.from_list([ROW, ROW]).save_to_disk(str(tmp_path / "saved"))
    assert len(load_examples(str(tmp_path / "saved"))) == 2
    with pytest.raises(InputError, match="cannot load dataset"):
        load_examples(str(tmp_path / "files"), split="validation")
    with pytest.raises(InputError, match="no such file"):
        load_examples(str(tmp_path / "missing.csv"))


def test_conversational_explicit_and_implicit_prompt(tmp_path):
    explicit = {"prompt": [USER], "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "5"}]}
    multi = {"chosen": CONV["chosen"] + [USER, {"role": "assistant", "content": "still 4"}],
             "rejected": CONV["chosen"] + [USER, {"role": "assistant", "content": "22"}]}
    a, b, c = load_examples(_jsonl(tmp_path, [explicit, CONV, multi]))
    assert a.prompt == [USER] and a.chosen[0]["content"] == "4"
    assert b.prompt == [USER] and b.chosen == CONV["chosen"][1:] and b.rejected == CONV["rejected"][1:]
    assert c.prompt == CONV["chosen"] + [USER] and c.chosen == [{"role": "assistant", "content": "still 4"}]
    assert a.prompt_key() == b.prompt_key() == "user: What is 2+2?"


BAD = [  # (file lines, message start, message part)
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a",'], "bad.jsonl:2: ", "invalid JSON"),
    (["[1, 2]"], "bad.jsonl:1: ", "row must be an object"),
    ([{"prompt": "a", "rejected": "c"}], "bad.jsonl:1: field 'chosen': ", "missing"),
    ([{"chosen": "b", "rejected": "c"}], "bad.jsonl:1: field 'prompt': ", "missing"),
    ([ROW, {**ROW, "chosen": ""}], "bad.jsonl:2: field 'chosen': ", "empty; --bad-rows skip skips such rows"),
    ([{**ROW, "prompt": " \n"}], "bad.jsonl:1: field 'prompt': ", "whitespace only"),
    ([{**ROW, "rejected": 3}], "bad.jsonl:1: field 'rejected': ", "must be a string or a list of messages, got int"),
    ([{**ROW, "rejected": []}], "bad.jsonl:1: field 'rejected': ", "an empty list of messages"),
    ([{**CONV, "chosen": [USER, {"role": "assistant", "content": " "}]}], "bad.jsonl:1: field 'chosen[1]': ",
     "content is whitespace only"),
    ([{**CONV, "chosen": [{"role": "user"}]}], "bad.jsonl:1: field 'chosen[0]': ", "'role' and 'content'"),
    ([{**CONV, "chosen": ["hi"]}], "bad.jsonl:1: field 'chosen[0]': ", "'role' and 'content'"),
    ([{**ROW, "rejected": " 1 3"}], "bad.jsonl:1: field 'rejected': ", "identical to chosen"),
    ([{**ROW, "rejected": CONV["rejected"]}], "bad.jsonl:1: field 'rejected': ", "both be strings or both"),
    ([{**CONV, "prompt": "hi"}], "bad.jsonl:1: field 'prompt': ", "must be a list of messages"),
    ([{"chosen": [USER], "rejected": [{"role": "user", "content": "other"}]}], "bad.jsonl:1: field 'prompt': ",
     "share no leading messages"),
    (["", "  "], "bad.jsonl: ", "no rows"),
]


@pytest.mark.parametrize("lines,where,what", BAD)
def test_bad_input_names_file_line_and_field(tmp_path, lines, where, what):
    path = _jsonl(tmp_path, lines, "bad.jsonl")
    with pytest.raises(InputError) as err:
        load_examples(path)
    message = str(err.value)
    assert message.startswith(str(tmp_path / where)) and what in message and "\n" not in message


def test_bad_files(tmp_path):
    (tmp_path / "x.json").write_text('[\n{"prompt": "a",\n "chosen": }\n]')
    (tmp_path / "y.json").write_text('{"rows": []}')
    (tmp_path / "z.parquet").write_text("not parquet")
    (tmp_path / "w.jsonl").write_bytes(b"\xff\xfe")
    for name, what in [("x.json", "x.json:3: invalid JSON"), ("y.json", "expected a list"),
                       ("z.parquet", "cannot read Parquet"), ("w.jsonl", "not UTF-8"),
                       ("missing.jsonl", "missing.jsonl: cannot read file: No such file")]:
        with pytest.raises(InputError, match=what):
            load_examples(str(tmp_path / name))


# --- tokenization ------------------------------------------------------------------------------------------

def _ids(tok, *tokens):
    return tok.convert_tokens_to_ids(list(tokens))


def _tokenize(examples, tok, max_length=512, max_prompt_length=256, **kw):
    return tokenize_examples(examples, tok, max_length=max_length, max_prompt_length=max_prompt_length, **kw)


def test_tokenize_explicit_expectation(tok):
    ex = Example("t:1", "sort: 3 1 =", " 1 3", " 3 1</s>")  # EOS already there: not added twice
    (pair,), stats = _tokenize([ex], tok)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert pair.prompt_ids == [bos] + _ids(tok, "sort", ":", "Ġ3", "Ġ1", "Ġ=")
    assert pair.chosen_ids == _ids(tok, "Ġ1", "Ġ3") + [eos]
    assert pair.rejected_ids == _ids(tok, "Ġ3", "Ġ1") + [eos]
    assert (pair.id, pair.prompt, pair.chosen) == ("t:1", "sort: 3 1 =", " 1 3")
    assert stats.to_dict() == {"rows": 1, "kept": 1, "truncated": 0, "dropped": 0}


def test_tokenize_splits_where_prompt_and_completion_diverge(tok):
    # "sor" + "t: ..." merges into the token "sort": the completion starts where the ids diverge (TRL's rule)
    (pair,), _ = _tokenize([Example("t:1", "sor", "t: 1 2", "t: 2 1")], tok)
    assert pair.prompt_ids == [tok.bos_token_id]
    assert pair.chosen_ids[:3] == _ids(tok, "sort", ":", "Ġ1")


def test_tokenize_conversational_uses_the_chat_template(tok):
    ex = Example("t:1", [USER], [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}])
    (pair,), _ = _tokenize([ex], tok)
    assert tok.decode(pair.prompt_ids) == "<s>user:\nWhat is 2+2?</s>\nassistant:\n"
    assert tok.decode(pair.chosen_ids) == "4</s>\n"
    (wrapped,), _ = _tokenize([Example("t:1", "What is 2+2?", "4", "5")], tok, apply_chat_template=True)
    assert (wrapped.prompt_ids, wrapped.chosen_ids) == (pair.prompt_ids, pair.chosen_ids)


def test_tokenize_without_chat_template(tok):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(tok.name_or_path)
    bare.chat_template = None
    with pytest.raises(InputError, match="field 'apply_chat_template': the tokenizer has no chat template"):
        _tokenize([Example("t:1", "a", "b", "c")], bare, apply_chat_template=True, source="d.jsonl")


def test_tokenize_matches_trl(tok, tiny_world):
    from types import SimpleNamespace

    from datasets import Dataset
    from trl.trainer.dpo_trainer import DPOTrainer

    std = [json.loads(line) for line in tiny_world.eval_path.read_text().splitlines()[:4]]
    std.append({"prompt": "What color is the", "chosen": " sky? Blue.", "rejected": " sky? Green</s>"})
    wrapped = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in std]
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    for rows, kw in [(std, {}), ([CONV], {}), (wrapped, {}), (std, {"apply_chat_template": True})]:
        trl_rows = wrapped if kw else rows
        ds = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), Dataset.from_list(trl_rows), tok, args, "t")
        examples = [shapes.example(r, f"t:{i}", "t", i) for i, r in enumerate(rows)]
        pairs, _ = _tokenize(examples, tok, max_length=10_000, max_prompt_length=5_000, **kw)
        assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs] == \
            [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in ds]


def test_truncation_and_dropping(tok):
    eos = tok.eos_token_id
    long_prompt = Example("t:1", "sort: 9 8 7 6 5 =", " 5 6 7 8 9", " 9 8 7 6 5")
    (full,), _ = _tokenize([long_prompt], tok)
    (cut,), stats = _tokenize([long_prompt], tok, max_length=6, max_prompt_length=3)
    assert cut.prompt_ids == full.prompt_ids[-3:]  # the left of the prompt goes
    assert cut.chosen_ids == full.chosen_ids[:3] and cut.rejected_ids == full.rejected_ids[:3]
    assert eos not in cut.chosen_ids and (stats.truncated, stats.dropped) == (1, 0)

    same_start = Example("t:2", "sort: 1 2 3 =", " 1 2 3", " 1 3 2")  # identical once cut to 1 token
    pairs, stats = _tokenize([long_prompt, same_start], tok, max_length=4, max_prompt_length=3)
    assert [p.id for p in pairs] == ["t:1"] and stats.to_dict() == {"rows": 2, "kept": 1, "truncated": 1,
                                                                     "dropped": 1}
    with pytest.raises(InputError, match=r"^d.jsonl: no pairs left after truncation"):
        _tokenize([same_start], tok, max_length=3, max_prompt_length=3, source="d.jsonl")
    with pytest.raises(InputError, match="no rows"):
        _tokenize([], tok)


def test_world_data_round_trip(tiny_world, tok):
    pairs, stats = _tokenize(load_examples(str(tiny_world.train_path)), tok)
    assert stats.to_dict() == {"rows": 256, "kept": 256, "truncated": 0, "dropped": 0}
    assert all(p.chosen_ids[-1] == p.rejected_ids[-1] == tok.eos_token_id for p in pairs)
    bias = length_bias([len(p.chosen_ids) for p in pairs], [len(p.rejected_ids) for p in pairs])
    assert bias["pairs"] == 256 and bias["chosen_shorter"] > 0.15 and bias["chosen_longer"] > 0.15
    assert math.isclose(bias["chosen_shorter"] + bias["chosen_longer"] + bias["equal"], 1.0)


def test_length_bias_numbers():
    bias = length_bias([1, 3, 4, 2], [2, 3, 2, 4], [-1.0, 0.0, 2.0, -2.0])
    assert (bias["chosen_shorter"], bias["chosen_longer"], bias["equal"]) == (0.5, 0.25, 0.25)
    assert (bias["mean_chosen_len"], bias["mean_rejected_len"], bias["mean_len_ratio"]) == (2.5, 2.75, 1.0)
    # log-ratios sorted: log 1/2, log 1/2, 0, log 2; the median averages the middle two: exp(log(1/2) / 2) = √½
    assert bias["median_len_ratio"] == pytest.approx(0.5 ** 0.5)
    assert bias["margin_length_corr"] == pytest.approx(1.0)  # the margin follows the length difference exactly
    assert length_bias([], [])["pairs"] == 0


# --- split and batches -------------------------------------------------------------------------------------

def _examples(n_prompts, per_prompt=2):
    return [Example(f"f:{i}:{j}", f"p{i}", f"c{j}", "r") for i in range(n_prompts) for j in range(per_prompt)]


def test_split_by_prompt():
    examples = _examples(30)
    train, held = split_by_prompt(examples, 0.1, seed=1)
    held_keys = {e.prompt_key() for e in held}
    assert len(held_keys) == 3 and not held_keys & {e.prompt_key() for e in train}
    assert len(train) + len(held) == 60 and len(held) == 6
    assert train == [e for e in examples if e in train] and held == [e for e in examples if e in held]
    assert split_by_prompt(examples, 0.1, seed=1) == (train, held)
    assert split_by_prompt(examples[::-1], 0.1, seed=1)[1] == held[::-1]  # row order does not matter
    assert split_by_prompt(examples, 0.1, seed=2)[1] != held
    assert split_by_prompt(examples, 0.0, seed=1) == (examples, [])
    assert len(split_by_prompt(_examples(2), 0.01, seed=1)[1]) == 2  # one prompt, at least
    assert len(split_by_prompt(_examples(2), 0.99, seed=1)[0]) == 2  # one prompt kept for training
    assert split_by_prompt(_examples(1), 0.5, seed=1) == (_examples(1), [])


def _padding(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("group", [False, True])
def test_batch_order_is_a_deterministic_permutation(group):
    lengths = [random.Random(i).randint(5, 200) for i in range(300)]
    batches = batch_order(lengths, 8, seed=3, epoch=0, group_by_length=group)
    assert sorted(i for b in batches for i in b) == list(range(300))
    assert sorted(len(b) for b in batches) == [4] + [8] * 37  # one partial batch, kept
    assert all(type(i) is int for b in batches for i in b)
    assert batch_order(lengths, 8, seed=3, epoch=0, group_by_length=group) == batches
    assert batch_order(lengths, 8, seed=4, epoch=0, group_by_length=group) != batches
    assert batch_order(lengths, 8, seed=3, epoch=1, group_by_length=group) != batches


def test_grouping_by_length_reduces_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 400) for _ in range(1000)]
    plain = batch_order(lengths, 8, seed=0, epoch=0, group_by_length=False)
    grouped = batch_order(lengths, 8, seed=0, epoch=0, group_by_length=True)
    assert _padding(grouped, lengths) < 0.2 * _padding(plain, lengths)
    # batches are shuffled after grouping: the longest batch is not always first
    firsts = {max(lengths[i] for i in batch_order(lengths, 8, seed=s, epoch=0)[0]) for s in range(5)}
    assert len(firsts) > 1


def test_invalid_utf8_names_line_and_byte_offset(tmp_path):
    good = json.dumps(ROW).encode() + b"\n"
    path = tmp_path / "bad.jsonl"
    path.write_bytes(good + good + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(InputError) as err:
        load_examples(str(path))
    column = len(b'{"prompt": "caf')
    assert str(err.value) == (f"{path}:3: not UTF-8 text: byte 0xe9 at byte offset {2 * len(good) + column} "
                              f"(byte {column} of the line)")
    (tmp_path / "first.json").write_bytes(b"\xff\xfe[]")
    with pytest.raises(InputError, match=r"first.json:1: not UTF-8 text: byte 0xff at byte offset 0 "):
        load_examples(str(tmp_path / "first.json"))
