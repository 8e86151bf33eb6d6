"""A site of 2 gloo processes answers a coordinator's plans as a 1-process site does: the
same pseudo-gradients (float tolerance), steps, tokens and receipt, replicated (DDP) or
sharded (FSDP2), restarting from its saved state between rounds (a fresh Site each round)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from atoll.federation.coordinator import Coordinator
from atoll.federation.protocol import SiteUpdate, from_parts, header, tensor_bytes
from atoll.federation.settings import CoordinatorConfig, FederationConfig
from atoll.federation.site import Site
from atoll.model import ModelConfig
from atoll.tokenizer import byte_tokenizer
from atoll.train.distributed import Parallel
from atoll.train.inner import InnerConfig
from atoll.util.round_folders import RoundFolders
from atoll.util.storage import load_state
from tests.test_distributed import _free_port, _join

pytestmark = pytest.mark.slow


def _worker(rank: int, port: int, data: str, root: str) -> None:
    """One of 2 processes of site ``code``: every plan, DDP then FSDP2, the replies saved."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    plans = torch.load(Path(root) / "plans.pt")
    for shard in (False, True):
        par = Parallel.from_env(torch.device("cpu"), shard=shard, timeout_s=60)
        replies = []
        for head, blob in plans:  # a fresh Site each round: it resumes from what it saved
            site = Site("code", data, Path(root) / f"shard-{shard}", parallel=par)
            replies.append(site.answer(head, blob))
        if par.is_main:
            torch.save(replies, Path(root) / f"shard-{shard}.pt")
        else:
            assert replies == [({}, b"")] * len(plans)
    par.close()


@pytest.fixture(scope="module")
def runs(demo_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[Path, list[SiteUpdate]]:
    """Two streaming rounds answered by a 1-process site (the reference, whose updates the
    coordinator takes), then by 2-process sites."""
    root = tmp_path_factory.mktemp("dist-site")
    model = ModelConfig().build(byte_tokenizer(), seed=0)
    coord = Coordinator({n: p.detach() for n, p in model.named_parameters()}, CoordinatorConfig(
        run_id="d", model_config=model.config.to_dict(), total_steps=6, seq_len=64,
        federation=FederationConfig(rounds=2, steps_per_round=3, fragments=2),
        inner=InnerConfig(batch_size=4, warmup_steps=1)))
    reference = Site("code", demo_data["code"], root / "reference")
    plans, expected = [], []
    for _ in range(2):
        plan = coord.open_round(["code"])["code"]
        head, blob = json.loads(json.dumps(header(plan))), tensor_bytes(plan.weights)
        update = from_parts(*reference.answer(head, blob), SiteUpdate)
        assert coord.accept(update) is None
        coord.close()
        plans.append((head, blob))
        expected.append(update)
    torch.save(plans, root / "plans.pt")
    ctx = mp.spawn(_worker, args=(_free_port(), str(demo_data["code"]), str(root)), nprocs=2,
                   join=False)
    _join(ctx, 180)
    return root, expected


@pytest.mark.parametrize("shard", [False, True])
def test_a_two_process_site_answers_like_a_one_process_site(runs: tuple, shard: bool) -> None:
    root, expected = runs
    for (head, blob), want in zip(torch.load(root / f"shard-{shard}.pt"), expected,
                                  strict=True):
        got = from_parts(head, blob, SiteUpdate)
        assert (got.round, got.steps, got.tokens) == (want.round, want.steps, want.tokens)
        assert got.train_loss == pytest.approx(want.train_loss, rel=1e-5)  # the global loss
        assert got.receipt["contributions"] == want.receipt["contributions"]  # rows read
        assert sorted(got.delta) == sorted(want.delta)
        for n, d in want.delta.items():
            assert d.abs().max() > 0
            torch.testing.assert_close(got.delta[n], d, atol=2e-5, rtol=0), (got.round, n)
    # each process saved its own state: under FSDP2, its shard of the AdamW moments
    def moment(state_dir: Path) -> torch.Size:
        saved = load_state(RoundFolders(state_dir).path(2))["trainer"]["optimizer"]
        return saved["state"][0]["exp_avg"].shape

    full, rank1 = moment(root / "reference"), moment(root / f"shard-{shard}" / "rank-1")
    assert rank1 == (torch.Size([full[0] // 2, *full[1:]]) if shard else full)  # torch.chunk

