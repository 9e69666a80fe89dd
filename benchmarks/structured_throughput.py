"""Structured outputs: throughput with half the batch JSON-schema-constrained vs none, same run.

    python benchmarks/structured_throughput.py                 # SmolLM2 on CPU, 16 requests
    python benchmarks/structured_throughput.py --device cuda --num-requests 128

Both runs send the same prompts with the same max_tokens; in the constrained run every other
request carries a JSON schema (an object with a long array of strings, so it rarely finishes
early). Prints output tokens/s for both, their ratio (target >= 0.9), the time to compile a
typical schema (cold, and from the cache), and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}},
}, "required": ["title", "tags"], "additionalProperties": False}

TYPICAL = {  # what openai's parse() sends for a small nested Pydantic model
    "$defs": {"Address": {"type": "object", "properties": {
        "city": {"type": "string"}, "zip": {"type": "integer"}},
        "required": ["city", "zip"], "additionalProperties": False},
        "Color": {"enum": ["red", "green", "blue"], "type": "string"}},
    "type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}, "height": {"type": "number"},
        "favourite": {"$ref": "#/$defs/Color"}, "address": {"$ref": "#/$defs/Address"},
        "hobbies": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "height", "favourite", "address", "hobbies"],
    "additionalProperties": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()

    from corral import LLM, SamplingParams, StructuredOutput
    from corral.engine.structured import StructuredCompiler

    llm = LLM(args.model, device=args.device)
    prompts = [[{"role": "user", "content": f"List tags for article number {i} as JSON."}]
               for i in range(args.num_requests)]

    def params(constrained: bool) -> SamplingParams:
        so = StructuredOutput(json_schema=SCHEMA) if constrained else None
        return SamplingParams(temperature=0.8, seed=1, max_tokens=args.max_tokens, structured=so)

    def run(constrained_half: bool) -> tuple[float, int]:
        plist = [params(constrained_half and i % 2 == 0) for i in range(len(prompts))]
        start = time.perf_counter()
        outs = llm.chat(prompts, plist, use_tqdm=False)
        return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)

    run(False)  # warm up (and compile SCHEMA once, as a server would have)
    llm.core.compile_structured(params(True))
    base_s, base_tok = run(False)
    mixed_s, mixed_tok = run(True)
    base_tps, mixed_tps = base_tok / base_s, mixed_tok / mixed_s

    core = llm.core
    start = time.perf_counter()
    fresh = StructuredCompiler(core.tokenizer, core.model_config.vocab_size, core.eos_token_ids)
    info_s = time.perf_counter() - start
    start = time.perf_counter()
    fresh.compile(StructuredOutput(json_schema=TYPICAL))
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    fresh.compile(StructuredOutput(json_schema=json.loads(json.dumps(TYPICAL))))
    warm_s = time.perf_counter() - start

    print(f"device {core.device}, {len(prompts)} requests, max_tokens {args.max_tokens}")
    print(f"no constraints     : {base_tok} tokens in {base_s:.2f} s = {base_tps:.1f} tok/s")
    print(f"half JSON schema   : {mixed_tok} tokens in {mixed_s:.2f} s = {mixed_tps:.1f} tok/s")
    print(f"ratio              : {mixed_tps / base_tps:.2f}x (target >= 0.9x)")
    print(f"compile typical schema: {cold_s * 1000:.1f} ms cold, {warm_s * 1000:.3f} ms cached; "
          f"tokenizer index (once per engine): {info_s * 1000:.0f} ms")
    print(json.dumps({"base_tok_s": round(base_tps, 1), "mixed_tok_s": round(mixed_tps, 1),
                      "ratio": round(mixed_tps / base_tps, 3),
                      "compile_ms": round(cold_s * 1000, 2),
                      "compile_cached_ms": round(warm_s * 1000, 3),
                      "tokenizer_info_ms": round(info_s * 1000, 1)}))


if __name__ == "__main__":
    main()
