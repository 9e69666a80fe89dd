"""The pieces of multi-process tuning that need no processes: the step-wide length-grouped
order under accelerate's batch sharding, the effective batch, the launch command."""

from __future__ import annotations

import random

import pytest

from corral.tune.sft import StepLengthSampler, TuneConfig, describe_batch


def shard_steps(sampler, batch: int, processes: int, accum: int) -> list[set[int]]:
    """The examples of each optimizer step when accelerate shards the sampler's batches of
    `batch` over `processes` (process r gets batches r, r+N, ...), `accum` micro-batches each."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    per_process = [list(BatchSamplerShard(BatchSampler(sampler, batch, drop_last=False),
                                          num_processes=processes, process_index=r))
                   for r in range(processes)]
    steps = []
    for k in range(len(per_process[0]) // accum):
        steps.append({i for p in per_process for b in p[k * accum:(k + 1) * accum] for i in b})
    return steps


def test_processes_together_see_one_process_steps():
    lengths = [random.Random(7).randint(5, 60) for _ in range(48)]
    one = StepLengthSampler(8, lengths, seed=3)
    single = shard_steps(one, 8, 1, 1)
    for batch, processes, accum in [(4, 2, 1), (1, 2, 4), (2, 4, 1), (1, 4, 2)]:
        # the Trainer builds the sampler with batch x accumulation x processes = 8
        sampler = StepLengthSampler(batch * accum * processes, lengths, seed=3)
        assert shard_steps(sampler, batch, processes, accum) == single, (batch, processes)
    # the plain per-device grouping (transformers' own) does not line up like that
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    torch.manual_seed(0)  # it draws from the global RNG
    plain = LengthGroupedSampler(4, lengths=lengths)
    assert shard_steps(plain, 4, 2, 1) != single


def test_order_depends_on_seed_and_epoch_only():
    lengths = list(range(10, 50))
    a, b = StepLengthSampler(4, lengths, 1), StepLengthSampler(4, lengths, 1)
    assert list(a) == list(b) == list(a)  # repeatable: a resumed run replays its epoch
    assert sorted(a) == list(range(40))
    b.set_epoch(1)
    assert list(b) != list(a)
    assert list(StepLengthSampler(4, lengths, 2)) != list(a)


def test_effective_batch():
    cfg = TuneConfig(data="d", output="o", batch_size=3, grad_accum=2)
    assert describe_batch(cfg, 4)["effective"] == 24
    assert "4 process(es) x batch 3 x accumulation 2 = 24 examples" in \
        describe_batch(cfg, 4)["description"]
    cfg.packing = True
    assert describe_batch(cfg, 1)["description"].endswith("6 packed rows per optimizer step")


def test_launch_command_and_checks(tmp_path, capsys):
    from corral.cli import main
    from corral.tune.cli import accelerate_command

    cmd = accelerate_command(3, 12345)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "3"
    assert cmd[cmd.index("--main_process_port") + 1] == "12345"
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    base = ["tune", "--data", "examples/data/bilingual_sft.jsonl", "--output", str(tmp_path)]
    # said once, before any process starts
    assert main([*base, "--num-processes", "2"]) == 1
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and len(err.splitlines()) == 1
    assert main([*base, "--num-processes", "0"]) == 1
    assert "--num-processes must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["--batch-size", "--grad-accum"])
def test_bad_sizes_fail_before_launch(bad, tmp_path, capsys):
    from corral.cli import main

    assert main(["tune", "--data", "d.jsonl", "--output", str(tmp_path / "o"),
                 "--num-processes", "2", bad, "0"]) == 1
    assert "must be a positive integer" in capsys.readouterr().err
