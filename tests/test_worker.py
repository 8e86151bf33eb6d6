"""The site worker: the ClientApp shim's bytes in and out, and overlap trained for real in
the background between rounds."""

from __future__ import annotations

import json
import threading
import time

import torch

from atoll.engines.site_worker import SiteWorker, call_worker
from atoll.federation.coordinator import Coordinator
from atoll.federation.protocol import SiteUpdate, from_parts, header, tensor_bytes
from atoll.federation.settings import CoordinatorConfig, FederationConfig
from atoll.federation.site import Site
from atoll.model import ModelConfig
from atoll.tokenizer import byte_tokenizer
from atoll.train.inner import InnerConfig
from atoll.util.storage import load_state


def wait_until(condition, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_worker_trains_ahead_while_the_update_travels(demo_data, tmp_path):
    """Round 2's 4 overlap steps are the ones the worker trained in the background (only the
    2 after the merge are trained when the plan arrives), and the update is bit for bit the
    one a site that trains the overlap steps on receipt (the local engine's way) sends."""
    model = ModelConfig().build(byte_tokenizer(), seed=0)
    coord = Coordinator({n: p.detach() for n, p in model.named_parameters()}, CoordinatorConfig(
        run_id="w", model_config=model.config.to_dict(), total_steps=12, seq_len=64,
        federation=FederationConfig(rounds=2, steps_per_round=6, fragments=2, overlap_steps=4),
        inner=InnerConfig(batch_size=2)))
    reference = Site("code", demo_data["code"], tmp_path / "reference")
    site = Site("code", demo_data["code"], tmp_path / "state")
    worker = SiteWorker(site, tmp_path / "state").start()
    read_in_round_2 = []
    try:
        for r in (1, 2):
            plan = coord.open_round(["code"])["code"]
            head, blob = json.loads(json.dumps(header(plan))), tensor_bytes(plan.weights)
            if r == 2:  # count the batches the site reads for the plan (not those it reads
                # ahead for round 3 once it has answered)
                wait_until(lambda: site._ahead is not None)  # 4 steps trained meanwhile
                next_batch = site.reader.next_batch

                def counted(next_batch=next_batch):
                    if threading.current_thread() is not worker._ahead:
                        read_in_round_2.append(1)
                    return next_batch()

                site.reader.next_batch = counted
            update = from_parts(*call_worker(tmp_path / "state", head, blob), SiteUpdate)
            expected = from_parts(*reference.answer(head, blob), SiteUpdate)
            assert coord.accept(update) is None
            coord.close()
            assert update.steps == 6
            for n, d in expected.delta.items():
                assert torch.equal(update.delta[n], d), (r, n)
            if r == 1:  # the next plan is slow to come: the site trains meanwhile
                wait_until(lambda: site.trainer.step > 6)
        assert len(read_in_round_2) == 2  # not 6: the background steps were not redone
        # the schedule position the site saved at the end of round 2 (it trains on ahead)
        assert load_state(site.state.folders.path(2))["trainer"]["step"] == 12
    finally:
        worker.close()
