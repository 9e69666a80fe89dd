"""Tensor parallelism across processes: the process group, rank 0's driver, the worker loop.

    rank 0 (the engine: scheduler, sampler, server)          ranks 1..N-1 (engine.tp.main)
    ------------------------------------------------          -----------------------------------------
    runner.execute -> model.forward(ids, pos, meta)
        driver.send_forward: header + inputs  ---- ctl/data ---->  worker: the same forward
        the forward on shard 0  <------ all-reduce per o/down/embed ------>  on shard r
    runner -> model.compute_logits(rows)
        driver.send_logits: header + rows  ------------------>  worker: its logits slice
        cat(gathered slices)  <------------- gather ------------

Two process groups on one TCPStore: `ctl` (gloo, a long timeout: a worker waits there for the
next step while the server idles) carries the small step header; `data` (gloo on CPU, NCCL on
CUDA, a bounded timeout) carries the inputs and every collective inside a step. Groups are
built directly as backend objects (no torch.distributed global state), so one Python process
can open and close several TP engines.

Failure: a rank that dies breaks its sockets; the next collective on rank 0 raises (gloo
notices a closed peer at once), and a watchdog thread polls the worker processes so an idle
engine notices too (`TPDriver.failed`). Either way the engine stops with TensorParallelError
naming the rank and its exit code; workers exit when rank 0 goes away (a parent watch).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from corral.engine.config import EngineConfig
from corral.errors import CorralError

log = logging.getLogger("corral.engine")

CMD_STOP, CMD_FORWARD, CMD_LOGITS = 0, 1, 2
HEADER = 8  # int64s: cmd, t, b, width, num_decodes, has_rope, has_mask, n_rows
DATA_TIMEOUT = datetime.timedelta(seconds=120)  # one collective inside a step
CTL_TIMEOUT = datetime.timedelta(days=30)  # a worker waiting for the next step (idle server)
CONNECT_TIMEOUT = datetime.timedelta(seconds=300)  # workers import torch and load their shard


class TensorParallelError(CorralError):
    """A rank died or the ranks fell out of step: the engine cannot go on."""


class Comm:
    """This rank's collectives. `seconds` accumulates the time spent inside data collectives
    (the benchmark's all-reduce share)."""

    def __init__(self, rank: int, world: int, store, device: torch.device):
        self.rank, self.world, self.device = rank, world, device
        self.ctl = _gloo(dist.PrefixStore("ctl", store), rank, world, CTL_TIMEOUT)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = DATA_TIMEOUT
            self.data = dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rank, world, opts)
        else:
            self.data = _gloo(dist.PrefixStore("data", store), rank, world, DATA_TIMEOUT)
        self.seconds = 0.0
        self.calls = 0
        self.on_error = None  # rank 0: turns a broken collective into TensorParallelError

    def _wait(self, work) -> None:
        start = time.perf_counter()
        try:
            work.wait()
            if self.device.type == "cuda":
                torch.cuda.current_stream().synchronize()  # time the transfer, not the launch
        except RuntimeError as e:
            if self.on_error is not None:
                raise self.on_error(e) from None
            raise
        self.seconds += time.perf_counter() - start
        self.calls += 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` in place over the ranks."""
        if not t.is_contiguous():
            t = t.contiguous()
        self._wait(self.data.allreduce([t]))
        return t

    def broadcast(self, t: torch.Tensor, ctl: bool = False) -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        pg = self.ctl if ctl else self.data
        if ctl:  # not timed: a worker waits here for the next step
            try:
                pg.broadcast([t], opts).wait()
            except RuntimeError as e:
                if self.on_error is not None:
                    raise self.on_error(e) from None
                raise
        else:
            self._wait(pg.broadcast([t], opts))
        return t

    def gather(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `t` (same shape) on rank 0; None elsewhere."""
        opts = dist.GatherOptions()
        opts.rootRank = 0
        out = [torch.empty_like(t) for _ in range(self.world)] if self.rank == 0 else []
        self._wait(self.data.gather([out] if self.rank == 0 else [], [t], opts))
        return out if self.rank == 0 else None

    def min_int(self, value: int) -> int:
        """The smallest `value` over the ranks."""
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        t = torch.tensor([value], dtype=torch.int64)
        self.ctl.allreduce([t], opts).wait()
        return int(t.item())

    def gather_ints(self, values: list[int]) -> list[list[int]] | None:
        opts = dist.GatherOptions()
        opts.rootRank = 0
        t = torch.tensor(values, dtype=torch.int64)
        out = [torch.empty_like(t) for _ in range(self.world)] if self.rank == 0 else []
        self.ctl.gather([out] if self.rank == 0 else [], [t], opts).wait()
        return [o.tolist() for o in out] if self.rank == 0 else None


def _gloo(store, rank: int, world: int, timeout: datetime.timedelta):
    """A gloo group whose sockets listen on 127.0.0.1 only (the default device binds to the
    host name's address, which may face the network)."""
    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    opts._timeout = timeout
    return dist.ProcessGroupGloo(store, rank, world, opts)


def rank_device(device: torch.device, rank: int) -> torch.device:
    """cuda:(base + rank) on CUDA (one GPU per rank), the CPU otherwise."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def threads_per_rank(world: int) -> int:
    """CPU threads for each rank's torch: the cores this process may use, split N ways (TP on
    one CPU box oversubscribes otherwise)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // world)


def check_tp_config(config: EngineConfig, device: torch.device) -> None:
    """Refuse what tensor parallelism does not combine with, before any process starts."""
    n = config.tensor_parallel_size
    if not isinstance(n, int) or n < 1:
        raise CorralError(f"--tensor-parallel-size must be a positive integer, got {n!r}")
    if n == 1:
        return
    if config.enable_lora or config.lora_modules:
        raise CorralError("LoRA adapters are not supported with --tensor-parallel-size > 1")
    if config.quantization:
        raise CorralError(f"--quantize {config.quantization} is not supported with "
                          "--tensor-parallel-size > 1 (the shards run dense weights)")
    if device.type not in ("cpu", "cuda"):
        raise CorralError(f"tensor parallelism runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        need = (device.index or 0) + n
        if torch.cuda.device_count() < need:
            raise CorralError(f"--tensor-parallel-size {n} on {device} needs GPUs "
                              f"{device.index or 0}..{need - 1}; torch sees "
                              f"{torch.cuda.device_count()}")


def load_rank_model(config: EngineConfig, src, model_config, shard, dtype, device, max_len):
    """Build this rank's shard (rank 0 and workers share this one path)."""
    from corral.model.tp_layers import load_tp_model

    return load_tp_model(src, model_config, shard, dtype, device, max_len, seed=config.seed)


class TPDriver:
    """Rank 0's side: spawns ranks 1..N-1, feeds them every step, watches them."""

    def __init__(self, config: EngineConfig, device: torch.device):
        self.world = config.tensor_parallel_size
        self.device = device
        self.failed: str | None = None
        self.closed = False
        self._stopping = False  # workers exit on purpose from here on
        self._threads_before = torch.get_num_threads()
        # the store's socket is ours, bound to 127.0.0.1 (TCPStore alone listens on every
        # interface); the store owns the descriptor from here on
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        if device.type == "cuda":  # NCCL's own bootstrap sockets: loopback too (one node)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
        store = dist.TCPStore("127.0.0.1", self.port, self.world, True, timeout=CONNECT_TIMEOUT,
                              wait_for_workers=False, master_listen_fd=sock.detach(),
                              use_libuv=False)
        self.procs = [self._spawn(config, rank) for rank in range(1, self.world)]
        self._watch = threading.Thread(target=self._watchdog, name="corral-tp-watchdog",
                                       daemon=True)
        self._watch.start()
        try:
            self.comm = Comm(0, self.world, store, rank_device(device, 0))
        except RuntimeError as e:
            self.close(kill=True)
            raise TensorParallelError(f"tensor-parallel ranks did not connect: "
                                      f"{self.failed or e}") from None
        self.comm.on_error = self._broken
        self.store = store
        if device.type == "cpu":
            torch.set_num_threads(threads_per_rank(self.world))
        self.rank_param_bytes: list[int] = []
        self.rank_params: list[int] = []

    def _spawn(self, config: EngineConfig, rank: int) -> subprocess.Popen:
        env = dict(os.environ)
        # the workers import the same corral as this process
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        # -c rather than -m: corral.engine.tp is already imported by the package's __init__
        boot = "import sys; from corral.engine.tp import main; sys.exit(main(sys.argv[1:]))"
        cmd = [sys.executable, "-c", boot, "--rank", str(rank),
               "--world", str(self.world), "--port", str(self.port),
               "--parent", str(os.getpid()), "--config", json.dumps(asdict(config))]
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)

    def _watchdog(self) -> None:
        while not self.closed:
            for rank, p in enumerate(self.procs, start=1):
                code = p.poll()
                if code is not None and not self._stopping and self.failed is None:
                    self.failed = self._describe(rank, p, code)
                    log.critical("%s", self.failed)
            time.sleep(0.2)

    @staticmethod
    def _describe(rank: int, p: subprocess.Popen, code: int) -> str:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return (f"tensor-parallel rank {rank} (pid {p.pid}) {how}; the engine cannot go on "
                "(restart it)")

    def _broken(self, e: BaseException) -> TensorParallelError:
        """The error for a failed collective, naming the dead rank when one is found."""
        deadline = time.monotonic() + 2.0
        while self.failed is None and time.monotonic() < deadline:
            for rank, p in enumerate(self.procs, start=1):
                code = p.poll()
                if code is not None:
                    self.failed = self._describe(rank, p, code)
                    break
            else:
                time.sleep(0.05)
        if self.failed is None:
            self.failed = f"a tensor-parallel collective failed: {e}"
        return TensorParallelError(self.failed)

    def check(self) -> None:
        if self.failed is not None:
            raise TensorParallelError(self.failed)
        if self.closed:
            raise TensorParallelError("the tensor-parallel group is closed")

    def _header(self, *values: int) -> None:
        self.check()
        h = torch.zeros(HEADER, dtype=torch.int64)
        h[:len(values)] = torch.tensor(values, dtype=torch.int64)
        self.comm.broadcast(h, ctl=True)

    def send_forward(self, ids, pos, meta, rope_lens) -> None:
        """Send one forward's inputs (what ModelRunner.execute built) to the workers."""
        t, b = ids.shape[0], len(meta.query_lens)
        width = meta.block_tables.shape[1]
        host = torch.tensor(list(meta.query_lens) + list(meta.context_lens_host),
                            dtype=torch.int64, device=ids.device)
        parts = [ids, pos, meta.slot_mapping, meta.context_lens, meta.block_tables.reshape(-1)]
        if rope_lens is not None:
            parts.append(rope_lens)
        flat = torch.cat([p.to(torch.int64) for p in parts] + [host])
        self._header(CMD_FORWARD, t, b, width, meta.num_decodes, rope_lens is not None,
                     meta.decode_mask is not None, flat.numel())
        self.comm.broadcast(flat.to(self.comm.device))

    def send_logits(self, hidden: torch.Tensor) -> None:
        self._header(CMD_LOGITS, 0, 0, 0, 0, 0, 0, hidden.shape[0])
        self.comm.broadcast(hidden.contiguous().to(self.comm.device))

    def close(self, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop the workers (a STOP step, then wait; kill what does not exit)."""
        if self.closed:
            return
        self._stopping = True
        if not kill and self.failed is None:
            try:
                self._header(CMD_STOP)
            except (TensorParallelError, RuntimeError):
                pass
        self.closed = True
        if kill or self.failed is not None:  # the survivors cannot finish a step: end them
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.device.type == "cpu":
            torch.set_num_threads(self._threads_before)


# ---- the worker process ------------------------------------------------------------------

def _watch_parent(parent: int) -> None:
    """Exit when rank 0 is gone (its engine may have been killed without a STOP)."""
    while True:
        if os.getppid() != parent:
            print(f"corral tp worker {os.getpid()}: rank 0 (pid {parent}) is gone; exiting",
                  file=sys.stderr, flush=True)
            os._exit(1)
        time.sleep(0.5)


def worker_main(rank: int, world: int, port: int, parent: int, config: EngineConfig) -> int:
    from corral.engine.core import engine_max_len, resolve_engine_source
    from corral.engine.runner import kv_bytes_per_block
    from corral.loading import resolve_device, resolve_dtype
    from corral.model.attention import AttentionMetadata, build_decode_mask
    from corral.model.tp_layers import make_shard

    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    # Ctrl-C reaches the whole process group: rank 0 drains, then stops this rank itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    base = resolve_device(config.device)
    device = rank_device(base, rank)
    dtype = resolve_dtype(config.dtype, base)
    if device.type == "cpu":
        torch.set_num_threads(threads_per_rank(world))
    store = dist.TCPStore("127.0.0.1", port, world, False, timeout=CONNECT_TIMEOUT)
    comm = Comm(rank, world, store, device)
    src, model_config = resolve_engine_source(config)
    max_len = engine_max_len(config, model_config)
    model = load_rank_model(config, src, model_config, make_shard(model_config, rank, world),
                            dtype, device, max_len)
    model.attach(comm)
    comm.gather_ints([model.param_bytes(), sum(p.numel() for p in model.parameters())])
    block_size = config.block_size
    candidate = 1 << 62
    if device.type == "cuda" and not config.num_kv_blocks:
        candidate = _cuda_kv_blocks(model, config, device, dtype, max_len, block_size)
    num_blocks = comm.min_int(candidate)
    cfg = model.config
    shape = (num_blocks + 1, block_size, cfg.num_key_value_heads, cfg.head_dim)
    kv = [(torch.zeros(shape, dtype=dtype, device=device),
           torch.zeros(shape, dtype=dtype, device=device)) for _ in range(cfg.num_hidden_layers)]
    log.debug("rank %d ready: %d KV blocks of %d bytes", rank, num_blocks,
              kv_bytes_per_block(cfg, block_size, dtype))
    header = torch.zeros(HEADER, dtype=torch.int64)
    with torch.inference_mode():
        while True:
            comm.broadcast(header, ctl=True)
            cmd, t, b, width, nd, has_rope, has_mask, n = header.tolist()
            if cmd == CMD_STOP:
                return 0
            if cmd == CMD_LOGITS:
                hidden = torch.empty((n, cfg.hidden_size), dtype=dtype, device=device)
                model.compute_logits(comm.broadcast(hidden))
                continue
            flat = comm.broadcast(torch.empty(n, dtype=torch.int64, device=device))
            ids, pos, slots = (flat[i * t:(i + 1) * t] for i in range(3))
            ctx = flat[3 * t:3 * t + b]
            tables = flat[3 * t + b:3 * t + b + b * width].view(b, width)
            off = 3 * t + b + b * width
            rope = None
            if has_rope:
                rope, off = flat[off:off + t], off + t
            host = flat[off:off + 2 * b].tolist()
            qlens, ctx_host = host[:b], host[b:]
            mask = None
            if has_mask:
                mask = build_decode_mask(torch.tensor(ctx_host[:nd]), max(ctx_host[:nd]),
                                         dtype).to(device)
            meta = AttentionMetadata(slot_mapping=slots, block_tables=tables, context_lens=ctx,
                                     query_lens=qlens, context_lens_host=ctx_host,
                                     num_decodes=nd, decode_mask=mask)
            model(ids, pos, meta, kv, rope)


def _cuda_kv_blocks(model, config: EngineConfig, device, dtype, max_len: int,
                    block_size: int) -> int:
    """KV blocks that fit this GPU after the profiled step. Rank 0 runs the same profiled step
    at the same time (its driver is paused), so the collectives inside it pair up."""
    from corral.engine.runner import kv_bytes_per_block, profiled_kv_budget

    budget = profiled_kv_budget(model, device, dtype, config.gpu_memory_utilization,
                                config.max_num_batched_tokens or 8192, config.max_num_seqs or 256,
                                max_len, block_size)
    if config.kv_cache_memory_gb:
        budget = min(budget, config.kv_cache_memory_gb * 2**30)
    return int(budget // kv_bytes_per_block(model.config, block_size, dtype))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="corral-tp-worker",
                                description="one tensor-parallel worker rank (started by rank 0)")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--config", required=True, help="the EngineConfig as JSON")
    a = p.parse_args(argv)
    config = EngineConfig.from_kwargs(**json.loads(a.config))
    try:
        return worker_main(a.rank, a.world, a.port, a.parent, config)
    except Exception as e:  # noqa: BLE001 - reported, then the exit code tells rank 0
        print(f"corral tp worker rank {a.rank}: {type(e).__name__}: {e}", file=sys.stderr,
              flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
