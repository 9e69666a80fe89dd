"""`corral serve --lora`: two adapters and the base served at once through the real `openai`
client (each answer equals PEFT's greedy tokens), picked by `model` (and TGI's `lora`), listed
with their parent; adapters loaded and unloaded at run time; bad adapters answered 400/404."""

from __future__ import annotations

import httpx
import openai
import pytest

from corral.server.launch import ServerProcess
from tests.conftest import save_tiny_model, tiny_config
from tests.unit.test_lora import ALL, make_adapter, peft_greedy

pytestmark = pytest.mark.slow

KEY = "sk-lora-test"
HDR = {"Authorization": f"Bearer {KEY}"}
PROMPT = [5, 17, 99, 230, 41, 8, 77, 12, 150, 3]
N = 8


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, default_folder):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("lora-serve")
    base, _ = save_tiny_model(root / "base", tiny_config(max_position_embeddings=256,
                                                        vocab_size=49152), seed=4)
    AutoTokenizer.from_pretrained(default_folder).save_pretrained(base)
    return {"base": base,
            "zh": make_adapter(base, root / "zh", ALL, r=8, seed=5),
            "en": make_adapter(base, root / "en", ["q_proj", "v_proj", "gate_proj"], r=4, seed=6),
            "late": make_adapter(base, root / "late", ["o_proj", "up_proj"], r=2, seed=7),
            "big": make_adapter(base, root / "big", ["q_proj"], r=32, seed=8)}


@pytest.fixture(scope="module")
def server(dirs):
    args = ["--model", str(dirs["base"]), "--served-model-name", "base", "--api-key", KEY,
            "--lora", f"zh={dirs['zh']}", "--lora", f"en={dirs['en']}",
            "--max-loras", "2", "--max-lora-rank", "16"]
    with ServerProcess(args) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def tgi_tokens(server, model: str, text: str) -> list[int]:
    """Greedy token ids through TGI's /generate (which reports them), `lora` = model."""
    params = {"max_new_tokens": N, "details": True, "do_sample": False}
    if model != "base":
        params["lora"] = model
    r = httpx.post(server.url + "/generate", headers=HDR, timeout=120,
                   json={"inputs": text, "parameters": params})
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def test_models_lists_adapters_with_parent(client):
    cards = {m.id: m for m in client.models.list().data}
    assert {"base", "zh", "en"} <= set(cards)
    assert cards["zh"].model_extra["parent"] == "base"
    assert "parent" not in (cards["base"].model_extra or {})


def test_adapters_and_base_at_once_match_peft(client, dirs):
    from concurrent.futures import ThreadPoolExecutor

    def run(model):
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0,
                                      extra_body={"ignore_eos": True})
        return r.choices[0].text

    models = ["zh", "base", "en", "zh", "en", "base"]
    with ThreadPoolExecutor(6) as pool:  # one engine batch holds all three
        texts = list(pool.map(run, models))
    tok = _tokenizer(dirs)
    for model, text in zip(models, texts):
        want = peft_greedy(dirs["base"], None if model == "base" else dirs[model], PROMPT, N)
        assert text == tok.decode(want, skip_special_tokens=True), model
    assert len({texts[0], texts[1], texts[2]}) == 3  # the adapters really answer differently


def test_tgi_lora_parameter_matches_peft(server, dirs):
    text = "The capital of France is"
    ids = list(_tokenizer(dirs)(text)["input_ids"])
    for model in ("zh", "base", "en"):
        want = peft_greedy(dirs["base"], None if model == "base" else dirs[model], ids, N)
        if 2 in want:  # TGI stops at EOS (id 2); PEFT's reference loop does not
            want = want[:want.index(2) + 1]
        assert tgi_tokens(server, model, text) == want, model


def _tokenizer(dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(dirs["base"])


def test_load_use_unload_at_run_time(server, client, dirs):
    url = server.url
    body = {"lora_name": "late", "lora_path": str(dirs["late"])}
    assert httpx.post(url + "/v1/load_lora_adapter", json=body).status_code == 401  # API key
    r = httpx.post(url + "/v1/load_lora_adapter", json=body, headers=HDR)
    assert r.status_code == 200, r.text
    assert "late" in [m.id for m in client.models.list().data]
    r = client.completions.create(model="late", prompt=PROMPT, max_tokens=N, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == _tokenizer(dirs).decode(
        peft_greedy(dirs["base"], dirs["late"], PROMPT, N), skip_special_tokens=True)
    # with --max-loras 2, late + zh + en took turns in the slots; all still answer
    assert client.completions.create(model="en", prompt=PROMPT, max_tokens=2).choices[0].text
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "late"}, headers=HDR)
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt=PROMPT, max_tokens=2)
    assert "late" not in [m.id for m in client.models.list().data]


def test_errors_have_their_status(server, client, dirs, tmp_path):
    url = server.url

    def load(name, path):
        return httpx.post(url + "/v1/load_lora_adapter", headers=HDR,
                          json={"lora_name": name, "lora_path": str(path)})

    r = load("ghost", tmp_path / "missing")
    assert r.status_code == 400 and "'ghost'" in r.text and "no such folder" in r.text
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "adapter_config.json").write_text("{oops")
    r = load("junk", tmp_path / "junk")
    assert r.status_code == 400 and "not valid JSON" in r.text
    r = load("big", dirs["big"])
    assert r.status_code == 400 and "rank 32 is over --max-lora-rank 16" in r.text
    r = load("zh", dirs["zh"])
    assert r.status_code == 400 and "already loaded" in r.text
    r = httpx.post(url + "/v1/unload_lora_adapter", headers=HDR, json={"lora_name": "nope"})
    assert r.status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2)
    r = httpx.post(url + "/generate", headers=HDR,
                   json={"inputs": "hi", "parameters": {"max_new_tokens": 2, "lora": "nope"}})
    assert r.status_code == 404
    # the others are still served, TGI's `lora` included
    r = httpx.post(url + "/generate", headers=HDR,
                   json={"inputs": "hi", "parameters": {"max_new_tokens": 2, "lora": "zh"}})
    assert r.status_code == 200, r.text
    assert client.completions.create(model="zh", prompt=PROMPT, max_tokens=2).choices[0].text
    assert httpx.get(url + "/health").json()["status"] == "ok"
