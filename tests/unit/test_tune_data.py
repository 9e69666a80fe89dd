"""Tune data: every format -> token ids whose trained labels are exactly the answers + end token;
bad rows fail early with file, row and problem."""

from __future__ import annotations

import csv
import json

import pytest

from corral.chat import get_chat_format
from corral.errors import CorralError
from corral.tune.data import encode_examples, load_examples, rows_to_examples


@pytest.fixture(scope="module")
def tokenizer(default_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_folder)


def answer_runs(tokenizer, ids, labels) -> list[str]:
    """Decoded runs of consecutive trained label positions."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            assert lab == i  # labels are the ids themselves where trained
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


Q1, A1, Q2, A2 = "中国的首都是哪里？", "北京。", "And France?", "Paris is the capital."
CASES = {
    # name: (rows, expected trained runs with the SmolLM2 (ChatML) tokenizer)
    "messages": ([{"messages": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": Q1},
                                {"role": "assistant", "content": A1},
                                {"role": "user", "content": Q2},
                                {"role": "assistant", "content": A2}]}],
                 [A1 + "<|im_end|>", A2 + "<|im_end|>"]),
    "sharegpt": ([{"conversations": [{"from": "human", "value": Q1},
                                     {"from": "gpt", "value": A1}]}],
                 [A1 + "<|im_end|>"]),
    "alpaca": ([{"instruction": "Translate to English", "input": "你好", "output": "Hello"}],
               ["Hello<|im_end|>"]),
    "prompt-completion": ([{"prompt": Q2, "completion": A2}], [A2 + "<|im_end|>"]),
    "prompt-completion-chat": ([{"prompt": [{"role": "user", "content": Q2}],
                                 "completion": [{"role": "assistant", "content": A2}]}],
                               [A2 + "<|im_end|>"]),
    "human-assistant": ([{"text": f"<s>Human: {Q1}\n</s><s>Assistant: {A1}\n</s>"
                                  f"<s>Human: {Q2}\n</s><s>Assistant: {A2}"}],
                        # SmolLM2 has no <s>/</s>: each answer ends with its real EOS
                        [A1 + "\n<|im_end|>", A2 + "\n<|im_end|>"]),  # the missing end is added
    "plain-text": ([{"text": "Once upon a time."}], ["Once upon a time.<|im_end|>"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_trained_labels_are_exactly_answers_plus_end_token(tokenizer, name):
    rows, expected = CASES[name]
    examples = rows_to_examples(rows, "data.jsonl")
    fmt_name = "human-assistant" if name == "human-assistant" else None
    fmt = get_chat_format(fmt_name, tokenizer)
    (enc,), dropped = encode_examples(examples, tokenizer, fmt, max_seq_len=512)
    assert dropped == 0
    assert answer_runs(tokenizer, enc.input_ids, enc.labels) == expected
    # nothing is lost or doubled: the ids decode to the whole rendered text
    text = tokenizer.decode(enc.input_ids)
    for piece in expected:
        assert piece in text
    if examples[0].messages is not None:
        assert "</s>" not in text and "<s>" not in text
        assert text == fmt.render(examples[0].messages, add_generation_prompt=False)


def test_train_on_prompt_trains_everything(tokenizer):
    rows, _ = CASES["alpaca"]
    fmt = get_chat_format(None, tokenizer)
    (enc,), _ = encode_examples(rows_to_examples(rows, "d.json"), tokenizer, fmt, 512,
                                train_on_prompt=True)
    assert enc.labels == enc.input_ids


def test_truncation_drops_examples_without_answer_tokens(tokenizer):
    rows = [{"instruction": "word " * 200, "output": "ok"}, {"instruction": "hi", "output": "ok"}]
    fmt = get_chat_format(None, tokenizer)
    kept, dropped = encode_examples(rows_to_examples(rows, "d.json"), tokenizer, fmt, 64)
    assert dropped == 1 and len(kept) == 1 and len(kept[0].input_ids) <= 64


ROWS = [{"instruction": "Say hi", "input": "", "output": "Hi!"},
        {"instruction": "Count", "input": "1 2", "output": "3"}]


def write(tmp_path, kind: str, rows=ROWS):
    path = tmp_path / f"data.{kind}"
    if kind == "csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "dataset":
        from datasets import Dataset

        Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["csv", "jsonl", "json", "parquet", "dataset"])
def test_every_file_type_reads_the_same_examples(tmp_path, kind):
    examples = load_examples(str(write(tmp_path, kind)))
    assert [e.messages for e in examples] == [
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}],
        [{"role": "user", "content": "Count\n\n1 2"}, {"role": "assistant", "content": "3"}]]
    assert examples[1].where == f"data.{kind} row 2"


def test_example_files_load(tmp_path):
    ha = load_examples("examples/data/bilingual_sft.csv")
    chat = load_examples("examples/data/bilingual_sft.jsonl")
    assert len(ha) == len(chat) >= 30
    assert ha[0].chat_format == "human-assistant" and ha[0].messages == chat[0].messages


def bad(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name,text,message", [
    ("data.csv", "instruction,input\nhi,\nyo,\n",
     "data.csv row 1: missing column 'output'"),
    ("data.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n',
     "data.jsonl row 2: missing column 'output'"),
    ("data.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": " "}\n',
     "data.jsonl row 2: empty answer in column 'output'"),
    ("data.csv", ("text\n\"<s>Human: hi\n</s><s>Assistant: yo\n</s>\"\n"
                  "\"<s>Human: hi\n</s><s>Assistant: \n</s>\"\n"),
     "data.csv row 2: empty answer after '<s>Assistant: '"),
    ("chat.jsonl", ('{"messages": [{"role": "user", "content": "q"}, '
                    '{"role": "assistant", "content": ""}]}\n'),
     "chat.jsonl row 1: empty answer in message 1 of 'messages'"),
    ("data.jsonl", ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"\n'
                    '{"prompt": "c", "completion": "d"}\n'),
     "data.jsonl row 2: unparsable JSON"),
    ("data.csv", "prompt,completion\na,b\nc,d,e\n", "data.csv row 2: unparsable row"),
    ("data.jsonl", '{"question": "a", "answer": "b"}\n', "data.jsonl row 1: unknown data format"),
    ("chat.jsonl", '{"messages": [{"role": "user", "content": "q"}]}\n',
     "chat.jsonl row 1: no assistant answer"),
])
def test_bad_data_fails_before_training_naming_file_row_and_problem(tmp_path, name, text,
                                                                    message):
    from corral.tune.sft import TuneConfig, train

    path = bad(tmp_path, name, text)
    with pytest.raises(CorralError) as err:
        load_examples(path)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)
    # through train(): the same error comes before the (here missing) model is even looked up
    cfg = TuneConfig(model=str(tmp_path / "no-such-model"), data=path,
                     output=str(tmp_path / "out"))
    with pytest.raises(CorralError) as err2:
        train(cfg)
    assert str(err2.value) == str(err.value)
    assert not (tmp_path / "out").exists()


def test_unknown_data_format_flag(tmp_path):
    with pytest.raises(CorralError, match="unknown --data-format 'yaml'"):
        load_examples(str(write(tmp_path, "jsonl")), data_format="yaml")
