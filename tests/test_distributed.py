"""Several processes of one site train as one: 2 gloo processes on the CPU, each with its
share of the global batch, take the same AdamW steps as one process with the whole batch,
replicated (DDP) or sharded (FSDP2); the streamed full tensors are the weights."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from atoll.model import PRESETS
from atoll.train.distributed import Parallel, fits, training_bytes
from atoll.train.inner import InnerConfig, InnerTrainer

STEPS, BATCH, SEQ, VOCAB = 3, 4, 32, 256
CFG = InnerConfig(lr=3e-3, warmup_steps=1, batch_size=BATCH, grad_accum=2, grad_clip=0.1,
                  precision="fp32")  # a clip that bites: the norm is of the global gradient
MODES = ("ddp", "fsdp", "wrong-slice")


def _model() -> torch.nn.Module:
    # float64, so that the order of the gradient sums (per process, then across them) stays
    # far below what the comparison looks at, even where AdamW divides tiny gradients
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(PRESETS["tiny"](VOCAB), dtype=torch.float64)


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
            for _ in range(STEPS * CFG.grad_accum)]


def _train(model: torch.nn.Module, next_batch: object, forward: torch.nn.Module | None = None
           ) -> None:
    InnerTrainer(model, CFG, total_steps=10, forward=forward).run(next_batch, STEPS)


def _worker(rank: int, port: int, out: str) -> None:
    """One of 2 processes: each mode from the same initial weights, the result saved."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    par = Parallel.from_env(torch.device("cpu"), timeout_s=60)
    for mode in MODES:
        par.shard = mode == "fsdp"
        model = _model()
        forward = par.wrap(model)
        if mode == "fsdp":  # the stream of a freshly sharded model is its initial weights
            first = dict(par.full_tensors(model))
            if par.is_main:
                torch.save(first, Path(out) / "stream0.pt")
            assert par.is_main or all(t is None for t in first.values())
        # every rank reads rank 0's rows in "wrong-slice"
        split = Parallel(0, 2) if mode == "wrong-slice" else par
        _train(model, split.batches(iter(_batches()).__next__), forward)
        weights = dict(par.full_tensors(model))
        if par.is_main:
            torch.save(weights, Path(out) / f"{mode}.pt")
    _time_budget(par, out)
    par.close()


def _time_budget(par: Parallel, out: str) -> None:
    """Train for 0.5 s where rank 1 alone is out of time after step 1 (it pauses there):
    every rank must stop after step 1, or the next step's gradient sum waits forever."""
    model = _model()
    forward = par.wrap(model)

    def on_step(step: int, loss: float) -> None:
        if step == 1 and par.rank == 1:
            time.sleep(0.6)

    result = InnerTrainer(model, CFG, 10, forward=forward).run(
        par.batches(iter(_batches() * 20).__next__), 0, 0.5, on_step, par.any_rank)
    steps: list[int | None] = [None, None]
    torch.distributed.all_gather_object(steps, result.steps)
    if par.is_main:
        torch.save(steps, Path(out) / "time-budget.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(ctx: mp.ProcessContext, timeout_s: float) -> None:
    """Wait for spawned processes (an error in one is raised here), killing them after
    ``timeout_s`` (a collective that never completes would otherwise hang the suite)."""
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the processes did not finish in {timeout_s:.0f} s")


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The weights after each mode's steps, trained by 2 gloo processes."""
    out = tmp_path_factory.mktemp("dist")
    _join(mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=False), 60)
    return out


@pytest.fixture(scope="module")
def one_process() -> dict[str, torch.Tensor]:
    """The reference: one process, the whole global batch, the same steps."""
    model = _model()
    batches = iter(_batches())
    _train(model, lambda: next(batches))
    return {n: p.detach().float() for n, p in model.named_parameters()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_like_one(two_process_runs: Path, one_process: dict, mode: str
                                      ) -> None:
    got = torch.load(two_process_runs / f"{mode}.pt")
    init = {n: p.detach().float() for n, p in _model().named_parameters()}
    assert _max_diff(got, init) > 1e-3  # the steps moved the weights
    print(mode, _max_diff(got, one_process))
    assert _max_diff(got, one_process) < 1e-6


@pytest.mark.slow
def test_a_rank_reading_the_wrong_rows_is_seen(two_process_runs: Path, one_process: dict
                                               ) -> None:
    got = torch.load(two_process_runs / "wrong-slice.pt")
    print("wrong", _max_diff(got, one_process))
    assert _max_diff(got, one_process) > 1e-4


@pytest.mark.slow
def test_a_time_budget_ends_every_rank_at_the_same_step(two_process_runs: Path) -> None:
    steps = torch.load(two_process_runs / "time-budget.pt")
    assert steps == [1, 1]


@pytest.mark.slow
def test_streamed_full_tensors_are_the_unsharded_weights(two_process_runs: Path) -> None:
    streamed = torch.load(two_process_runs / "stream0.pt")
    init = {n: p.detach().float() for n, p in _model().named_parameters()}
    assert _max_diff(streamed, init) == 0.0
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in streamed.values())


def test_the_global_batch_is_split_into_contiguous_disjoint_shares() -> None:
    batch = torch.arange(12).reshape(6, 2)
    shares = [Parallel(r, 3).local_rows(batch) for r in range(3)]
    assert torch.equal(torch.cat(shares), batch)
    assert torch.equal(Parallel(0, 1).local_rows(batch), batch)
    with pytest.raises(ValueError, match="multiple of the site's 4 processes"):
        Parallel(1, 4).local_rows(batch)


def test_a_model_too_big_for_one_device_is_sharded_by_its_size() -> None:
    model = _model()
    n = sum(p.numel() for p in model.parameters())
    assert training_bytes(model) == 16 * n  # fp32 weights, gradients, two AdamW moments
    assert fits(model)  # a CPU is taken to fit
