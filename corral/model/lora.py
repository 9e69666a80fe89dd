"""Multi-LoRA: many PEFT adapters on one base model, batched together (S-LoRA / Punica style).

Nothing here touches the model's math. `LoRAManager.install` wraps each target Linear from the
outside in a `LoRALinear`, which runs whatever computes the base output (dense, GGUF or Q8_0
kernels: install LoRA after `install_packed`) and then adds, per adapter present in the step,
the delta of that adapter's rows:

    y = base(x)                                    # every token, one matmul
    for slot, rows in step groups:                 # tokens grouped by adapter slot
        y[rows] += (x[rows] @ A[slot]^T) @ B[slot]^T   # rank-r matmuls, scaling folded into B

Rows of base requests (slot 0) add nothing. Our fused projections get the adapter's parts
stacked: for qkv_proj, A = [A_q; A_k; A_v] ([r_q + r_k + r_v, D]) and B is block diagonal,
so the q/k/v deltas land in their own slices of the fused output (a part the adapter does not
target is simply absent).

    x ──► A_q ─┐          ┌─► B_q ─► y[:, q]
    x ──► A_k ─┼─ [R] ────┼─► B_k ─► y[:, k]      (one [R, D] and one [out, R] matmul)
    x ──► A_v ─┘          └─► B_v ─► y[:, v]

Adapters are validated and read on the host (`load_adapter`, safe to call from any thread);
making one resident (`LoRAManager.activate`) only moves its tensors into a slot, between steps.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from corral.errors import CorralError

# our module -> (HF/PEFT part names, in the order they are fused)
FUSED = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
         "self_attn.o_proj": ("o_proj",),
         "mlp.gate_up_proj": ("gate_proj", "up_proj"),
         "mlp.down_proj": ("down_proj",)}
PART_OF = {p: (mod, i) for mod, parts in FUSED.items() for i, p in enumerate(parts)}

_ids = itertools.count(1)  # process-unique adapter ids: 0 is the base
# The stacked path (LoRAManager._stack): when a step's leading decode rows (one token each)
# number at most this many and hold 2+ adapters, they run one stacked, masked matmul pair per
# module instead of two per adapter. It trades flops (every row runs every present adapter's
# rank) for fewer small ops, which pays while each adapter has few rows (measured on the
# default GGUF model, 32 decode rows over 4 rank-16 adapters: 0.91x the base step stacked,
# 0.44x on ranges); above it, and for prefill rows always, each adapter's contiguous rows run
# on their own (the range path). 64 = the CPU default max_num_seqs.
STACK_MAX_TOKENS = 64


class LoRAError(CorralError):
    """A bad adapter (folder, config, shapes, rank, targets): the message names it."""


@dataclass
class LoRARequest:
    """Which adapter a request runs under (vLLM's shape): `name`, loaded from `path` the first
    time the name is seen."""

    name: str
    path: str | None = None


@dataclass(eq=False)
class Adapter:
    """One adapter's weights per wrapped module (host tensors, read-only once loaded)."""

    name: str
    path: str
    rank: int  # the largest part rank
    # "model.layers.{i}.self_attn.qkv_proj" -> (A [R, in], B [out, R] with scaling folded in)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for a, b in self.weights.values())


def _fail(name: str, path, problem: str) -> LoRAError:
    return LoRAError(f"LoRA adapter {name!r} ({path}): {problem}")


def load_adapter(name: str, path: str | Path, config, max_rank: int,
                 dtype: torch.dtype = torch.float32) -> Adapter:
    """Read and check a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors/.bin)
    against the base `config`; returns host tensors ready for `LoRAManager.activate`."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise _fail(name, path, "no such folder")
    cfg_file = folder / "adapter_config.json"
    if not cfg_file.is_file():
        if (folder / "config.json").is_file():
            raise _fail(name, path, "this is a full model (config.json, no adapter_config.json): "
                                    "serve it with --model, not --lora")
        raise _fail(name, path, "adapter_config.json is missing (not a PEFT adapter folder)")
    try:
        acfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise _fail(name, path, f"adapter_config.json is not valid JSON ({e})") from None
    if not isinstance(acfg, dict):
        raise _fail(name, path, "adapter_config.json is not a JSON object")
    ptype = str(acfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise _fail(name, path, f"peft_type {ptype} is not LoRA")
    unsupported = [f"{k}={acfg[k]!r}" for k in ("use_dora", "modules_to_save")
                   if acfg.get(k)]
    if acfg.get("bias") not in (None, "none"):
        unsupported.append(f"bias={acfg['bias']!r}")
    if unsupported:
        raise _fail(name, path, f"{', '.join(unsupported)} is not supported (plain LoRA on "
                                f"Linear layers only)")
    state = _read_state(name, folder)
    alpha = float(acfg.get("lora_alpha", 8))
    rslora = bool(acfg.get("use_rslora", False))
    alpha_pattern = acfg.get("alpha_pattern") or {}

    parts: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    # LoRA matrices first, so an unsupported target is named before any extra weight it saved
    for key in sorted(state, key=lambda k: ".lora_A." not in k):
        a = state[key]
        if ".lora_A." not in key:
            if ".lora_B." in key:
                continue
            raise _fail(name, path, f"weight {key} is not a LoRA A/B matrix "
                                    f"(only Linear LoRA weights are supported)")
        prefix = key.split(".lora_A.")[0]  # base_model.model.model.layers.3.self_attn.q_proj
        b = state.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise _fail(name, path, f"{key} has no matching lora_B weight")
        layer, part = _locate(prefix)
        if layer is None or part not in PART_OF:
            target = prefix.rsplit(".", 1)[-1]
            raise _fail(name, path, f"target module {target!r} is not supported (Corral applies "
                                    f"LoRA to {', '.join(PART_OF)})")
        if not 0 <= layer < config.num_hidden_layers:
            raise _fail(name, path, f"layer {layer} does not exist in the base "
                                    f"({config.num_hidden_layers} layers)")
        r = a.shape[0]
        if r > max_rank:
            raise _fail(name, path, f"rank {r} is over --max-lora-rank {max_rank}")
        in_f, out_f = _part_shape(config, part)
        if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            raise _fail(name, path, f"{prefix}: lora_A {tuple(a.shape)} / lora_B "
                                    f"{tuple(b.shape)} do not fit the base's {part} "
                                    f"({out_f}x{in_f}; is this adapter for another model?)")
        a_key = next((k for k in alpha_pattern if prefix.endswith(k)), None)
        a_val = float(alpha_pattern[a_key]) if a_key else alpha
        scale = a_val / (math.sqrt(r) if rslora else r)
        mod, i = PART_OF[part]
        parts.setdefault((layer, mod), {})[i] = (a.to(dtype), (b.float() * scale).to(dtype))
    if not parts:
        raise _fail(name, path, "no LoRA weights found")
    weights = {}
    for (layer, mod), got in parts.items():
        sizes = [_part_shape(config, p)[1] for p in FUSED[mod]]
        a_cat = torch.cat([got[i][0] for i in sorted(got)], 0)
        b_cat = torch.zeros(sum(sizes), a_cat.shape[0], dtype=dtype)
        col = 0
        for i in sorted(got):
            row0 = sum(sizes[:i])
            b_i = got[i][1]
            b_cat[row0:row0 + sizes[i], col:col + b_i.shape[1]] = b_i
            col += b_i.shape[1]
        weights[f"model.layers.{layer}.{mod}"] = (a_cat.contiguous(), b_cat)
    rank = max(a.shape[0] for g in parts.values() for a, _ in g.values())
    return Adapter(name, str(folder), rank, weights)


def _read_state(name: str, folder: Path) -> dict[str, torch.Tensor]:
    st, pt = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st))
        if pt.is_file():
            return torch.load(str(pt), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise _fail(name, folder, f"cannot read the adapter weights ({e})") from None
    raise _fail(name, folder, "adapter_model.safetensors is missing")


def _locate(prefix: str) -> tuple[int | None, str]:
    bits = prefix.split(".")
    part = bits[-1]
    if "layers" in bits:
        i = bits.index("layers")
        if i + 1 < len(bits) and bits[i + 1].isdigit():
            return int(bits[i + 1]), part
    return None, part


def _part_shape(config, part: str) -> tuple[int, int]:
    """(in, out) features of an HF Llama projection."""
    from corral.model.llama import head_dim_of

    d, hd, inter = config.hidden_size, head_dim_of(config), config.intermediate_size
    return {"q_proj": (d, config.num_attention_heads * hd),
            "k_proj": (d, config.num_key_value_heads * hd),
            "v_proj": (d, config.num_key_value_heads * hd),
            "o_proj": (config.num_attention_heads * hd, d),
            "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}[part]


def bytes_per_rank(config, dtype: torch.dtype) -> int:
    """Bytes one unit of rank costs an adapter targeting every module (A and B of all parts)."""
    elem = torch.tensor([], dtype=dtype).element_size()
    per_layer = sum(sum(_part_shape(config, p)) for p in PART_OF)
    return per_layer * config.num_hidden_layers * elem


# ---- the step context and the wrapper ---------------------------------------------------------

class LoRAStep:
    """Which rows of the current step belong to which resident slot; set by the runner before
    each forward (`LoRAManager.set_step`, which starts from `clear()`), read by every
    LoRALinear of that forward. One object is shared by all wrapped modules."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        # (slot weights by module, first row, end row): the range path
        self.groups: list[tuple[dict, int, int]] = []
        # rows [0, stack_rows) on the stacked path: module -> (A_cat, B_cat, layout), and
        # layout -> [stack_rows, sum R] 0/1 mask keeping each row to its adapter's columns
        self.stacked: dict[str, tuple[torch.Tensor, torch.Tensor, tuple]] | None = None
        self.masks: dict[tuple, torch.Tensor] = {}
        self.stack_rows = 0


class LoRALinear(nn.Module):
    """base(x) plus each present adapter's delta on its rows. `base` is whatever module ran
    here before (nn.Linear, GGUFLinear, ...); its output is all this reads."""

    def __init__(self, base: nn.Module, name: str, step: LoRAStep):
        super().__init__()
        self.base = base
        self.name = name
        self.step = step

    @property
    def weight(self) -> torch.Tensor:  # code that inspects the base layer still finds it
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # a fresh tensor (every base computes one), so adding in place is safe
        step = self.step
        if step.stacked is not None:
            entry = step.stacked.get(self.name)
            if entry is not None:
                a, b, layout = entry
                d = step.stack_rows
                xs, ys = (x, y) if d == x.shape[0] else (x[:d], y[:d])
                h = (xs @ a.T).mul_(step.masks[layout])  # each row keeps its adapter's part
                ys.addmm_(h, b.T)
        for weights, start, end in step.groups:
            ab = weights.get(self.name)
            if ab is None:  # this adapter does not target this module (or layer)
                continue
            a, b = ab
            # y[rows] += (x[rows] A^T) B^T on views: no gather, no scatter
            y[start:end].addmm_(x[start:end] @ a.T, b.T)
        return y


# ---- slots, LRU, the registry -----------------------------------------------------------------

class LoRAManager:
    """Known adapters (by name), `max_loras` resident slots (LRU beyond that), and the per-step
    row groups. Engine-thread only, except `load_adapter`, which callers run anywhere."""

    def __init__(self, model, max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device):
        if max_loras < 1:
            raise CorralError("--max-loras must be at least 1")
        if max_rank < 1:
            raise CorralError("--max-lora-rank must be at least 1")
        self.config = model.config
        self.max_loras, self.max_rank = max_loras, max_rank
        self.dtype, self.device = dtype, device
        self.adapters: dict[str, Adapter] = {}  # registered by name
        # resident: adapter id -> (adapter, its weights on the device); order = LRU first
        self.resident: OrderedDict[int, tuple[Adapter, dict]] = OrderedDict()
        self.step = LoRAStep()
        self.num_loads = 0
        self._stack_cache: tuple[tuple, dict] | None = None  # (adapter ids, stacked weights)
        self.install(model)

    def install(self, model) -> None:
        """Wrap every target Linear (after any kernel install: the wrapper keeps the module
        it finds as its base)."""
        for i, layer in enumerate(model.model.layers):
            for mod in FUSED:
                parent_name, _, attr = mod.rpartition(".")
                parent = getattr(layer, parent_name)
                base = getattr(parent, attr)
                if not isinstance(base, LoRALinear):
                    setattr(parent, attr, LoRALinear(base, f"model.layers.{i}.{mod}", self.step))

    @property
    def budget_bytes(self) -> int:
        """What `max_loras` adapters of rank `max_rank` on every module take at most."""
        return self.max_loras * self.max_rank * bytes_per_rank(self.config, self.dtype)

    def load(self, name: str, path: str | Path) -> Adapter:
        return load_adapter(name, path, self.config, self.max_rank, self.dtype)

    def add(self, adapter: Adapter, replace: bool = False) -> None:
        if adapter.name in self.adapters and not replace:
            raise LoRAError(f"LoRA adapter {adapter.name!r} is already loaded (from "
                            f"{self.adapters[adapter.name].path})")
        self.adapters[adapter.name] = adapter

    def remove(self, name: str) -> Adapter:
        """Forget an adapter: new requests cannot pick it; running ones finish on its slot."""
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            raise LoRAError(f"LoRA adapter {name!r} is not loaded")
        return adapter

    def get(self, name: str) -> Adapter:
        adapter = self.adapters.get(name)
        if adapter is None:
            known = ", ".join(self.adapters) or "none"
            raise LoRAError(f"LoRA adapter {name!r} is not loaded (loaded: {known})")
        return adapter

    def activate(self, adapter: Adapter, in_use: set[int]) -> bool:
        """Make `adapter` resident (evicting the least recently used adapter that no running
        sequence needs); False when every slot is held by running sequences."""
        if adapter.id in self.resident:
            self.resident.move_to_end(adapter.id)
            return True
        if len(self.resident) >= self.max_loras:
            victim = next((i for i in self.resident if i not in in_use), None)
            if victim is None:
                return False
            del self.resident[victim]
            self._stack_cache = None  # may hold the victim's stacked copies
        weights = {k: (a.to(self.device), b.to(self.device)) for k, (a, b) in
                   adapter.weights.items()}
        weights["__id__"] = adapter.id  # lets a step name the slot it reads
        self.resident[adapter.id] = (adapter, weights)
        self.num_loads += 1
        return True

    def set_step(self, batch) -> bool:
        """Order the batch's rows by adapter (in place; decodes stay first, as attention
        needs) and record each adapter's contiguous token ranges; True when any row has one.
        Callers read batch.seqs after this, so sampled rows follow the new order."""
        # every step starts from nothing: stacked weights and row masks describe one step's
        # rows, and a base-only step that kept the last ones added their deltas to base rows
        # (or failed on a mask of another step's height)
        self.step.clear()
        if all(s.lora is None for s in batch.seqs):
            return False
        rows = sorted(zip(batch.seqs, batch.num_new_tokens),
                      key=lambda r: (r[1] != 1, r[0].lora.id if r[0].lora is not None else 0))
        batch.seqs[:] = [s for s, _ in rows]
        batch.num_new_tokens[:] = [n for _, n in rows]
        num_decodes = sum(1 for _, n in rows if n == 1)  # they come first
        groups: list[tuple[dict, int, int]] = []
        pos, prev = 0, None
        for seq, n in rows:
            if seq.lora is not None:
                # a run of one adapter's rows is one group, but never across the end of the
                # decodes (the stacked path may take the decodes alone)
                if prev is seq.lora and groups and groups[-1][2] == pos != num_decodes:
                    groups[-1] = (groups[-1][0], groups[-1][1], pos + n)  # extend the run
                else:
                    groups.append((self.resident[seq.lora.id][1], pos, pos + n))
            prev = seq.lora
            pos += n
        decode_groups = [g for g in groups if g[2] <= num_decodes]
        if len(decode_groups) > 1 and num_decodes <= STACK_MAX_TOKENS:
            self._stack(decode_groups, num_decodes)
            groups = groups[len(decode_groups):]
        self.step.groups = groups
        return True

    def _stack(self, groups, num_rows: int) -> None:
        """Decode-sized steps are bound by the number of small ops, not their flops: stack
        the adapters of rows [0, num_rows) per module (A_cat [sum R, in], B_cat [out, sum R],
        cached for the last combination of adapters) and mask each row to its own adapter's
        columns (rows of the base: all zero)."""
        ids = tuple(g[0]["__id__"] for g in groups)  # distinct: one group per adapter here
        if self._stack_cache is None or self._stack_cache[0] != ids:
            slots = [g[0] for g in groups]
            stacked = {}
            for name in {n for s in slots for n in s if n != "__id__"}:
                parts = [s.get(name) for s in slots]
                ranks = tuple(0 if p is None else p[0].shape[0] for p in parts)
                a_cat = torch.cat([p[0] for p in parts if p is not None], 0)
                b_cat = torch.cat([p[1] for p in parts if p is not None], 1)
                stacked[name] = (a_cat, b_cat.contiguous(), ranks)
            self._stack_cache = (ids, stacked)
        stacked = self._stack_cache[1]
        masks = {}
        for ranks in {entry[2] for entry in stacked.values()}:
            offsets = [sum(ranks[:k]) for k in range(len(ranks) + 1)]
            mask = torch.zeros(num_rows, offsets[-1], dtype=self.dtype, device=self.device)
            for k, (_, start, end) in enumerate(groups):
                mask[start:end, offsets[k]:offsets[k + 1]] = 1
            masks[ranks] = mask
        self.step.stacked, self.step.masks, self.step.stack_rows = stacked, masks, num_rows

    def listing(self) -> list[dict]:
        return [{"name": a.name, "path": a.path, "rank": a.rank, "bytes": a.nbytes,
                 "resident": a.id in self.resident} for a in self.adapters.values()]
