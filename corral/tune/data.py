"""Training data: file rows -> validated examples -> token ids with assistant-only labels.

    rows (CSV, JSON, JSONL, Parquet, saved HF dataset, hub id)
      -> Example (messages, or pre-rendered segments for a `text` column)   [validated, no model]
      -> segments [(text, is_answer)] in the model's chat format           [corral.chat]
      -> input_ids + labels (-100 outside answers unless train_on_prompt)

Formats (detected from the columns, or `data_format`):
  text               `text`: plain text (all trained), or Llama2-Chinese Human/Assistant
                     turns, parsed back into messages by corral.chat (answers trained)
  messages           `messages` / `conversations`: [{role, content}] or ShareGPT [{from, value}]
  alpaca             `instruction`, optional `input` and `system`, `output`
  prompt-completion  `prompt`, `completion` (strings, or message lists)

Every problem is found before a model is loaded and raised as one CorralError that names the
file, the row (1-based, header not counted) and the problem.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from corral.errors import CorralError

FORMATS = ("text", "messages", "alpaca", "prompt-completion")
FORMAT_ALIASES = {"sharegpt": "messages", "conversations": "messages", "chat": "messages",
                  "completion": "prompt-completion", "prompt_completion": "prompt-completion"}
ROLE_NAMES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
              "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
              "system": "system"}

Segment = tuple[str, bool]


@dataclass
class Example:
    """One training sample: `messages` to render with the chat format, or ready `segments`."""

    where: str  # "data.csv row 7", for error messages
    messages: list[dict] | None = None
    segments: list[Segment] | None = None
    chat_format: str | None = None  # the format the row was written in, if it was pre-rendered


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    meta: dict = field(default_factory=dict)


# --- reading rows ---------------------------------------------------------------------------

def read_rows(source: str) -> tuple[str, list[dict]]:
    """(display name, rows as dicts) from a file, a saved dataset folder or a hub id."""
    path = Path(source).expanduser()
    name = path.name or source
    if path.is_dir():
        return name, _read_saved_dataset(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            return name, _read_csv(path, name, "\t" if suffix == ".tsv" else ",")
        if suffix == ".jsonl":
            return name, _read_jsonl(path, name)
        if suffix == ".json":
            return name, _read_json(path, name)
        if suffix == ".parquet":
            return name, _read_parquet(path, name)
        raise CorralError(f"{name}: unknown data file type {suffix or '(none)'!r}; use .csv, "
                          ".tsv, .json, .jsonl, .parquet, a saved dataset folder or a hub id")
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise CorralError(f"data not found: {source!r} is no file, folder or hub id (owner/name)")
    return source, _read_hub(source)


def _read_csv(path: Path, name: str, delimiter: str) -> list[dict]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = reader.fieldnames or []
            rows = []
            for i, row in enumerate(reader, 1):
                if None in row or any(v is None for v in row.values()):
                    n = len(header) + len(row.get(None, [])) - sum(v is None for v in row.values())
                    raise CorralError(f"{name} row {i}: unparsable row: {n} fields but the header "
                                      f"has {len(header)} ({', '.join(header)})")
                rows.append(row)
    except UnicodeDecodeError as e:
        raise CorralError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise CorralError(f"{name} row {reader.line_num}: unparsable CSV: {e}") from None
    return rows


def _read_jsonl(path: Path, name: str) -> list[dict]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise CorralError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for line in lines:
        if not line.strip():
            continue
        i = len(rows) + 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorralError(f"{name} row {i}: unparsable JSON: {e.msg} at column {e.colno}") \
                from None
        if not isinstance(row, dict):
            raise CorralError(f"{name} row {i}: expected a JSON object, got "
                              f"{type(row).__name__}")
        rows.append(row)
    return rows


def _read_json(path: Path, name: str) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise CorralError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved as .json
            return _read_jsonl(path, name)
        raise CorralError(f"{name}: unparsable JSON at line {e.lineno} column {e.colno}: "
                          f"{e.msg}") from None
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
        lists = [v for k, v in data.items() if k in ("train", "data", "rows") and
                 isinstance(v, list)]
        if not lists:
            raise CorralError(f"{name}: expected a list of objects (or {{\"train\": [...]}})")
        data = lists[0]
    if not isinstance(data, list):
        raise CorralError(f"{name}: expected a list of objects, got {type(data).__name__}")
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise CorralError(f"{name} row {i}: expected a JSON object, got "
                              f"{type(row).__name__}")
    return data


def _read_parquet(path: Path, name: str) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise CorralError(f"{name}: unreadable Parquet file: {e}") from None


def _read_saved_dataset(path: Path) -> list[dict]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise CorralError(f"{path}: not a saved Hugging Face dataset folder "
                          f"(datasets.save_to_disk): {str(e).splitlines()[0][:160]}") from None
    if isinstance(ds, DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    return ds.to_list()


def _read_hub(repo_id: str) -> list[dict]:
    from datasets import load_dataset

    try:
        ds = load_dataset(repo_id, split="train")
    except Exception as e:  # noqa: BLE001 -- network, auth, missing repo, bad files: all one line
        reason = str(e).strip().splitlines()[0][:160] if str(e) else type(e).__name__
        raise CorralError(f"cannot load dataset {repo_id!r} from the Hugging Face Hub or its "
                          f"cache: {reason}") from None
    return ds.to_list()


# --- formats -> examples ----------------------------------------------------------------------

def detect_format(columns: set[str]) -> str | None:
    """The data format implied by a row's columns, or None."""
    if "messages" in columns or "conversations" in columns:
        return "messages"
    # one telltale column is enough: a missing partner is then reported as a missing column
    if "instruction" in columns:
        return "alpaca"
    if "prompt" in columns or "completion" in columns:
        return "prompt-completion"
    if "text" in columns:
        return "text"
    return None


def load_examples(source: str, data_format: str | None = None) -> list[Example]:
    """Read and validate every row of `source`; raise CorralError naming file and row."""
    name, rows = read_rows(source)
    return rows_to_examples(rows, name, data_format)


def rows_to_examples(rows: list[dict], name: str, data_format: str | None = None
                     ) -> list[Example]:
    if not rows:
        raise CorralError(f"{name}: no rows")
    fmt = (data_format or "auto").strip().lower()
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    if fmt == "auto":
        fmt = detect_format(set(rows[0]))
        if fmt is None:
            raise CorralError(f"{name} row 1: unknown data format: columns "
                              f"{', '.join(map(str, rows[0])) or '(none)'}; expected text, "
                              "messages/conversations, instruction+output or prompt+completion "
                              "(or give --data-format)")
    elif fmt not in FORMATS:
        raise CorralError(f"unknown --data-format {data_format!r}; choose from auto, "
                          f"{', '.join(FORMATS)}, sharegpt")
    convert = {"text": _text_example, "messages": _messages_example,
               "alpaca": _alpaca_example, "prompt-completion": _prompt_completion_example}[fmt]
    from corral.chat import looks_like_human_assistant

    ha = fmt == "text" and looks_like_human_assistant(str(rows[0].get("text") or ""))
    out = []
    for i, row in enumerate(rows, 1):
        where = f"{name} row {i}"
        try:
            out.append(convert(row, where, ha) if fmt == "text" else convert(row, where))
        except CorralError as e:
            raise CorralError(f"{where}: {e}") from None
    return out


def _field(row: dict, column: str, required: bool = True) -> str:
    if column not in row:
        if required:
            raise CorralError(f"missing column {column!r} (found: {', '.join(map(str, row))})")
        return ""
    value = row[column]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CorralError(f"column {column!r} should hold text, not {type(value).__name__}")
    return value


def _answer(value: str, where: str) -> str:
    if not value.strip():
        raise CorralError(f"empty answer in {where}")
    return value


def _text_example(row: dict, where: str, human_assistant: bool) -> Example:
    text = _field(row, "text")
    if not text.strip():
        raise CorralError("empty text in column 'text'")
    if not human_assistant:
        return Example(where, segments=[(text, True)])  # plain text: trained as a whole
    from corral.chat import parse_human_assistant

    messages = parse_human_assistant(text)
    _check_conversation(messages, "text")
    # the turns are re-rendered in the model's own tokens (see corral.chat.specials_for)
    return Example(where, messages=messages, chat_format="human-assistant")


def _messages_example(row: dict, where: str) -> Example:
    column = "messages" if "messages" in row else "conversations"
    raw = row.get(column)
    if column not in row:
        raise CorralError(f"missing column 'messages' (or 'conversations') "
                          f"(found: {', '.join(map(str, row))})")
    if isinstance(raw, str):  # a JSON string in a CSV cell
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CorralError(f"column {column!r} is not valid JSON: {e.msg}") from None
    return Example(where, messages=_to_messages(raw, column))


def _to_messages(raw, column: str) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise CorralError(f"column {column!r} should be a non-empty list of messages")
    messages = []
    for j, m in enumerate(raw):
        if not isinstance(m, dict):
            raise CorralError(f"message {j} of {column!r} is not an object")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role is None or content is None:
            raise CorralError(f"message {j} of {column!r} needs role/content (or from/value)")
        if str(role).lower() not in ROLE_NAMES:
            raise CorralError(f"message {j} of {column!r} has unknown role {role!r}")
        if not isinstance(content, str):
            raise CorralError(f"message {j} of {column!r}: content should be text")
        role = ROLE_NAMES[str(role).lower()]
        if role == "assistant":
            _answer(content, f"message {j} of {column!r}")
        messages.append({"role": role, "content": content})
    _check_conversation(messages, column)
    return messages


def _check_conversation(messages: list[dict], column: str) -> None:
    from corral.chat import validate_messages

    try:
        validate_messages(messages)
    except CorralError as e:
        raise CorralError(f"{e} in {column!r}") from None
    if not any(m["role"] == "assistant" for m in messages):
        raise CorralError(f"no assistant answer in {column!r}")


def _alpaca_example(row: dict, where: str) -> Example:
    instruction = _field(row, "instruction")
    extra = _field(row, "input", required=False)
    output = _answer(_field(row, "output"), "column 'output'")
    system = _field(row, "system", required=False)
    if not instruction.strip():
        raise CorralError("empty instruction in column 'instruction'")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return Example(where, messages=messages)


def _prompt_completion_example(row: dict, where: str) -> Example:
    prompt, completion = row.get("prompt"), row.get("completion")
    for column in ("prompt", "completion"):
        if column not in row:
            raise CorralError(f"missing column {column!r} (found: {', '.join(map(str, row))})")
    if isinstance(prompt, list) and isinstance(completion, list):  # conversational (TRL)
        messages = _to_messages(prompt + completion, "prompt+completion")
        return Example(where, messages=messages)
    prompt, completion = _field(row, "prompt"), _field(row, "completion")
    if not prompt.strip():
        raise CorralError("empty prompt in column 'prompt'")
    _answer(completion, "column 'completion'")
    return Example(where, messages=[{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": completion}])


# --- examples -> token ids and labels ---------------------------------------------------------

def example_segments(example: Example, chat_format, eos_text: str | None,
                     tokenizer=None) -> list[Segment]:
    """The example's (text, is_answer) segments; every answer ends with a stop/EOS token.

    With `tokenizer`, only stop strings that are single tokens of it count as an end: an answer
    ending with, say, a literal `<|im_end|>` the vocab lacks still gets the real EOS."""
    from corral.chat import render_for_training, token_id

    if example.segments is not None:
        segs = list(example.segments)
        stops: tuple[str, ...] = ()
    else:
        segs = render_for_training(chat_format, example.messages)
        stops = tuple(s for s in chat_format.stop_strings
                      if tokenizer is None or token_id(tokenizer, s) is not None)
    if eos_text:
        stops += (eos_text,)
    out = []
    for text, is_answer in segs:
        if is_answer and eos_text and not text.endswith(stops):
            text += eos_text  # the model must learn to stop after every answer
        out.append((text, is_answer))
    return out


class SegmentTokenizer:
    """Tokenizes segments one by one, so each answer's tokens are exactly its own text.

    Separately tokenized pieces also match inference: there the prompt (ending at the
    assistant header) is tokenized alone and the answer is generated token by token.
    SentencePiece tokenizers that prepend a space to every call get a newline prefix that is
    then cut off, so a piece mid-text is tokenized as it would be in context.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        with_special = tokenizer("a")["input_ids"]
        plain = self._ids("a")
        n = len(with_special) - len(plain)
        self.bos_ids = with_special[:n] if n > 0 and with_special[n:] == plain else []
        self.bos_text = getattr(tokenizer, "bos_token", None) or None
        first = tokenizer.convert_ids_to_tokens(plain[:1])
        self.prefix_space = bool(first and str(first[0]).startswith("\u2581"))
        self.nl = self._ids("\n")

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def piece(self, text: str, first: bool) -> list[int]:
        """Ids of one segment. BOS/EOS tokens in it are cut out (see corral.chat.encode_text):
        the text right after one is encoded fresh, like at the start of a text."""
        from corral.chat import split_specials

        ids: list[int] = []
        fresh = first
        for chunk, tid in split_specials(self.tok, text):
            if tid is not None:
                ids.append(tid)
            else:
                ids += self._chunk(chunk, fresh)
            fresh = True
        return ids

    def _chunk(self, text: str, first: bool) -> list[int]:
        if first or not self.prefix_space:
            return self._ids(text)
        ids = self._ids("\n" + text)
        return ids[len(self.nl):] if ids[: len(self.nl)] == self.nl else self._ids(text)

    def encode(self, segments: list[Segment], train_on_prompt: bool = False
               ) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        if self.bos_ids and not (segments and self.bos_text and
                                 segments[0][0].startswith(self.bos_text)):
            ids += self.bos_ids
            labels += [-100] * len(self.bos_ids)
        for k, (text, is_answer) in enumerate(segments):
            piece = self.piece(text, first=k == 0)
            ids += piece
            labels += piece if (is_answer or train_on_prompt) else [-100] * len(piece)
        return ids, labels


def encode_examples(examples: list[Example], tokenizer, chat_format, max_seq_len: int,
                    train_on_prompt: bool = False) -> tuple[list[Encoded], int]:
    """Token ids + labels for each example, cut to `max_seq_len`; returns (kept, dropped)
    where dropped counts examples left with no trained token after the cut."""
    seg_tok = SegmentTokenizer(tokenizer)
    eos_text = getattr(tokenizer, "eos_token", None)
    kept, dropped = [], 0
    for ex in examples:
        segs = example_segments(ex, chat_format, eos_text, tokenizer)
        ids, labels = seg_tok.encode(segs, train_on_prompt)
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if all(x == -100 for x in labels[1:]):
            dropped += 1
            continue
        kept.append(Encoded(ids, labels, {"where": ex.where}))
    return kept, dropped


def data_chat_format(examples: list[Example]) -> str | None:
    """The chat format pre-rendered rows were written in (then the model must use it)."""
    return examples[0].chat_format if examples else None
