"""The site worker: the ClientApp shim's bytes in and out, and overlap trained for real in
the background between rounds."""

from __future__ import annotations

import time

from atoll.engines.site_worker import SiteWorker, call_worker
from atoll.federation.coordinator import Coordinator, FederationConfig
from atoll.federation.protocol import SiteUpdate, from_parts, header, tensor_bytes
from atoll.federation.site import Site
from atoll.model import ModelConfig
from atoll.tokenizer import byte_tokenizer
from atoll.train.inner import InnerConfig
from atoll.train.outer import OuterConfig


def test_worker_trains_ahead_while_the_update_travels(demo_data, tmp_path):
    model = ModelConfig().build(byte_tokenizer(), seed=0)
    coord = Coordinator({n: p.detach() for n, p in model.named_parameters()}, run_id="w",
                        seed=0, federation=FederationConfig(rounds=2, steps_per_round=6,
                                                            fragments=2, overlap_steps=4),
                        outer=OuterConfig(), inner=InnerConfig(batch_size=2),
                        model_config=model.config.to_dict(), seq_len=64, total_steps=12)
    site = Site("code", demo_data["code"], tmp_path / "state", pace_s=0.05)
    worker = SiteWorker(site, tmp_path / "state").start()
    try:
        for r in (1, 2):
            plan = coord.open_round(["code"])["code"]
            head, blob = call_worker(tmp_path / "state", header(plan), tensor_bytes(plan.weights))
            update = from_parts(head, blob, SiteUpdate)
            assert coord.accept(update) is None
            coord.close()
            assert update.steps == 6
            if r == 1:
                time.sleep(1.0)  # the next plan is slow to come: the site trains meanwhile
                assert site.trainer.step > 6  # ahead of the global clock, in the background
        # round 2 took its 4 overlap steps from the background, then 2 after the merge
        assert site.trainer.step == 12
    finally:
        worker.close()
