"""The capacity planner (``atoll plan``) against the real things: modules built on the
``meta`` device, torch's AdamW state, tensors saved for the backward, the safetensors blobs a
real local run puts on the wire, and the command line."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from atoll.app.run import Run
from atoll.capacity.flops import parameter_count
from atoll.capacity.memory import activation_bytes_per_token, device_memory
from atoll.capacity.network import parse_latency, parse_rate, transfer_seconds
from atoll.capacity.plan import PlanConfig, build, model_shapes
from atoll.capacity.wire import PLAN_HEADER_BYTES, UPDATE_HEADER_BYTES, payload_bytes
from atoll.cli.main import main
from atoll.cli.plan import run_settings
from atoll.engines.local import LocalEngine
from atoll.federation.codecs import encode, parse_spec
from atoll.federation.protocol import tensor_bytes
from atoll.federation.site import Site
from atoll.model import PRESETS
from tests.conftest import small_config

CODECS = ["fp32", "bf16", "int8/64", "int8/64+top0.1", "int4/64+top0.1", "int2/64+rand0.05",
          "sign/256", "bf16+top0.05"]


@pytest.mark.parametrize("name", ["1b", "7b"])
def test_parameter_and_memory_counts_match_the_real_module(name):
    cfg = PRESETS[name](32000)
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = AutoModelForCausalLM.from_config(cfg)
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    assert parameter_count(cfg).total == numel
    assert sum(torch.Size(s).numel() for s in model_shapes(cfg).values()) == numel
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, foreach=False)
    opt.step()  # torch's own AdamW makes its state (on meta: sizes, no values)
    state = sum(t.nbytes for s in opt.state.values() for t in s.values() if t.dim())
    mem = device_memory(cfg, 1, 2048, gpus=1, memory_gib=80, bf16=True)
    assert mem.weights == sum(p.nbytes for p in params)
    assert mem.grads == sum(p.grad.nbytes for p in params)
    assert mem.optimizer == state
    sharded = device_memory(cfg, 1, 2048, gpus=8, memory_gib=80, bf16=True)
    # the rule a real site uses (atoll.train.distributed.fits): 16 B/param over 80% of 80 GiB
    assert sharded.sharded == (16 * numel > 0.8 * 80 * 1024**3)


def test_the_70b_preset_has_llama2_70b_shape():
    cfg = PRESETS["70b"](32000)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == 68_976_648_192
    assert parameter_count(cfg).total == 68_976_648_192


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("name", ["tiny", "small"])
def test_activation_estimate_against_the_saved_tensors(name, bf16):
    cfg = PRESETS[name](259)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    batch, seq = 2, 96
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in weights:  # weights themselves are counted apart
            saved[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=x, labels=x).loss
    assert loss.requires_grad
    predicted = device_memory(cfg, batch, seq, 1, 0, bf16).activations
    assert predicted == pytest.approx(sum(saved.values()), rel=0.05)
    assert activation_bytes_per_token(cfg, bf16, True) < activation_bytes_per_token(
        cfg, bf16, False)


@pytest.mark.parametrize("spec", CODECS)
def test_payload_bytes_are_the_blob_safetensors_writes(spec):
    rng = random.Random(spec)
    for _ in range(3):
        shapes = {f"model.layers.{i}.w": tuple(rng.randint(1, 300)
                                               for _ in range(rng.randint(1, 2)))
                  for i in range(rng.randint(1, 12))}
        named = {n: torch.randn(s) for n, s in shapes.items()}
        blob = tensor_bytes(encode(named, parse_spec(spec), seed=3))
        assert payload_bytes(shapes, parse_spec(spec)) == len(blob)


def test_bytes_per_round_exact_against_a_real_run(demo_data, tmp_path):
    """A packed codec up (one wire tensor per part) and a plain one down (one per tensor)."""
    cfg = small_config(demo_data, sites=["speeches", "code"],
                       federation={"rounds": 2, "steps_per_round": 1},
                       comm={"up": {"kind": "int4", "block": 64, "topk": 0.1},
                             "down": {"kind": "bf16"}})
    run = Run(cfg, tmp_path / "run")
    sites = [Site(s.name, s.data, run.out / "sites" / s.name) for s in cfg.sites]
    engine = LocalEngine(sites)
    plan = build(PlanConfig(**run_settings(cfg), tokens_per_second=1.0))
    for _ in range(2):
        plans = run.coordinator.open_round([s.name for s in sites])
        replies = list(engine.exchange(plans))
        for reply in replies:
            run.coordinator.accept(reply)
            down_blob = len(tensor_bytes(plans[reply.site].weights))
            assert len(tensor_bytes(reply.delta)) == plan.traffic.up_payload
            assert down_blob == plan.traffic.down_payload
            # headers: estimates, within a quarter (the first plan also carries the spec)
            assert reply.bytes_up - plan.traffic.up_payload == pytest.approx(
                UPDATE_HEADER_BYTES, rel=0.25)
            if reply.round > 1:
                assert reply.bytes_down - down_blob == pytest.approx(PLAN_HEADER_BYTES,
                                                                     rel=0.25)
        run.coordinator.close()
    engine.close()
    run.close()


def test_links_and_transfer_time():
    assert parse_rate("100mbit") == 1e8
    assert parse_rate("1Gbit/s") == parse_rate("1gbps") == 1e9
    assert parse_latency("80ms") == pytest.approx(0.08)
    assert transfer_seconds(1e9 / 8, 1e9, 0.05) == pytest.approx(1.05)
    for bad in ("fast", "100", "-1gbit"):
        with pytest.raises(ValueError, match="link rate"):
            parse_rate(bad)


def test_plan_invariants():
    cfg = PRESETS["125m"](32000)
    shapes = model_shapes(cfg)
    whole = build(PlanConfig(model=cfg, sites=8, gpus_per_site=8, latency=0.08), shapes)
    streamed = build(PlanConfig(model=cfg, sites=8, gpus_per_site=8, latency=0.08,
                                fragments=4), shapes)
    assert streamed.traffic.up_payload == pytest.approx(whole.traffic.up_payload / 4, rel=0.1)
    assert whole.round_s_overlap <= whole.round_s
    assert whole.round_s == pytest.approx(whole.compute_s + whole.transfer_s)
    # a ring all-reduce of bf16 gradients every step against one exchange a round
    n, h = 8, whole.cfg.steps_per_round
    assert whole.dp_bytes == pytest.approx(2 * 2 * (n - 1) / n * whole.params * 2 * h)
    assert whole.rounds * whole.tokens_per_round >= whole.token_budget


def test_cli_prints_a_table(capsys):
    assert main(["plan", "--model", "tiny,60m", "--sites", "4", "--gpu", "a100",
                 "--uplink", "100mbit,1gbit", "--latency", "80ms"]) == 0
    out = capsys.readouterr().out
    for label in ("weights (fp32)", "AdamW state", "activations", "tokens/s", "bytes up",
                  "utilisation, overlap", "reduction vs DP", "rounds", "wall time"):
        assert label in out
    assert "100 Mbit/s" in out and "1 Gbit/s" in out


@pytest.mark.parametrize("argv,msg", [
    (["--model", "7b", "--uplink", "fast"], "link rate"),
    (["--model", "7b", "--gpu", "cpu"], "--tokens-per-second"),
    (["--model", "9b"], "not a preset"),
    (["--model", "7b", "--up", "int5"], "not a codec"),
])
def test_cli_refuses_bad_input_in_one_line(capsys, argv, msg):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_data_parallel_bytes_by_hand():
    """A ring all-reduce among n machines: each sends and receives 2 (n-1)/n of the
    gradient per step; one machine sends nothing."""
    from atoll.capacity.wire import data_parallel_bytes

    assert data_parallel_bytes(1000, sites=4, steps=3) == 4 * 3 * 2 * 2 * 0.75 * 1000 * 4
    assert data_parallel_bytes(1000, sites=2, steps=1, grad_bytes=2) == 2 * 2 * 2 * 0.5 * 1000 * 2
    assert data_parallel_bytes(1000, sites=1, steps=10) == 0
