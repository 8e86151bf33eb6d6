"""Codecs: bounded error on odd shapes and dtypes, error feedback, corrupt payloads refused."""

from __future__ import annotations

import pytest
import torch

from atoll.app.metrics import read_metrics
from atoll.app.run import Run
from atoll.app.run_config import RunConfig
from atoll.app.simulate import simulate
from atoll.config import from_dict
from atoll.federation.codecs import CodecConfig, ErrorFeedback, decode, encode, parse_spec
from atoll.federation.protocol import tensor_bytes
from atoll.federation.site import Site
from atoll.util.errors import WireError
from tests.conftest import small_config

SHAPES = [(1,), (7,), (3, 5), (13, 17, 3), (129,), (64, 2)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def random_tensors(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}.weight": (torch.randn(s, generator=g) * 10 ** (i - 3)).to(dtype)
            for i, s in enumerate(SHAPES)}


def per_block(x: torch.Tensor, block: int, reduce: str = "amax") -> torch.Tensor:
    """Each entry's block absmax (or mean |value|, the last block padded with zeros): the
    scale its quantisation error is bounded by."""
    flat = x.float().reshape(-1)
    pad = torch.zeros(-(-flat.numel() // block) * block)
    pad[: flat.numel()] = flat.abs()
    blocks = pad.reshape(-1, block)
    stat = blocks.amax(1) if reduce == "amax" else blocks.mean(1)
    return stat.repeat_interleave(block)[: flat.numel()]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind, bound", [("fp32", 0.0), ("bf16", 2**-8), ("int8", 1 / 254),
                                         ("int4", 1 / 14), ("int2", 1 / 3), ("sign", None)])
def test_round_trip_error_is_bounded(kind, bound, dtype):
    cfg = CodecConfig(kind=kind, block=16)
    x = random_tensors(0, dtype)
    y = decode(encode(x, cfg), {k: v.shape for k, v in x.items()}, cfg)
    for k, v in x.items():
        assert y[k].shape == v.shape and y[k].dtype == torch.float32
        err = (y[k] - v.float()).abs().reshape(-1)
        if kind == "fp32":  # lossless: every value back exactly
            assert torch.equal(y[k], v.float()), k
        elif kind == "bf16":  # relative to each value
            assert (err <= bound * v.float().abs().reshape(-1) + 1e-30).all(), k
        elif kind == "sign":  # |v| comes back as the block's mean m: off by at most
            # max(m, absmax - m), less than the absmax that decoding to zero is off by
            m, top = per_block(v, 16, "mean"), per_block(v, 16)
            assert (err <= torch.maximum(m, top - m) * (1 + 1e-5) + 1e-30).all(), k
        else:  # relative to the block's largest value
            assert (err <= bound * per_block(v, 16) * (1 + 1e-5) + 1e-30).all(), k


def test_topk_keeps_the_largest_entries():
    cfg = CodecConfig(kind="fp32", topk=0.25)
    x = {"w": torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 1.0, -0.05])}
    y = decode(encode(x, cfg), {"w": x["w"].shape}, cfg)
    assert torch.equal(y["w"], torch.tensor([0.0, -5.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("numel", [256 * 3, 256 * 3 + 5, 100, 1])
def test_topk_keeps_the_largest_of_every_chunk(numel):
    """Chunks of 256 entries, the last one short: each keeps its own largest entries."""
    g = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=g)
    cfg = CodecConfig(kind="fp32", topk=0.05)
    y = decode(encode({"w": x}, cfg), {"w": x.shape}, cfg)["w"]
    for start in range(0, numel, 256):
        part, kept = x[start:start + 256], y[start:start + 256]
        k = max(1, -(-min(256, numel) * 5 // 100))  # ceil(5% of a chunk)
        expect = torch.zeros_like(part)
        top = part.abs().topk(min(k, part.numel())).indices
        expect[top] = part[top]
        assert torch.equal(kept, expect), start


def test_random_places_are_shared_by_the_round_and_send_no_index():
    """select = random: every site of a round keeps the same places (so the mean of their
    updates is as sparse as one), no index travels, and over rounds every place comes up."""
    cfg = parse_spec("int2/64+rand0.05")
    assert cfg.select == "random" and cfg.spec == "int2/64+rand0.05"
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(1024, generator=g) for _ in range(2))
    enc_a, enc_b = encode({"w": a}, cfg, seed=7), encode({"w": b}, cfg, seed=7)
    assert set(enc_a) == {"::q", "::scale"}  # values and scales only
    dec_a, dec_b = (decode(e, {"w": (1024,)}, cfg, seed=7)["w"] for e in (enc_a, enc_b))
    assert torch.equal(dec_a != 0, dec_b != 0)
    assert (dec_a != 0).sum() == 4 * 13  # ceil(5% of 256) in each of 4 chunks
    seen = torch.zeros(1024, dtype=torch.bool)
    for r in range(200):
        seen |= decode(encode({"w": a}, cfg, seed=r), {"w": (1024,)}, cfg, seed=r)["w"] != 0
    assert seen.all()
    other = decode(enc_a, {"w": (1024,)}, cfg, seed=8)["w"]  # the wrong round's places
    assert not torch.equal(other != 0, dec_a != 0)


def test_int2_levels_are_exact_on_their_grid():
    """int2 stores -1.5, -0.5, 0.5, 1.5 times absmax / 1.5: those values come back exactly."""
    x = {"w": torch.tensor([-3.0, -1.0, 1.0, 3.0, 3.0, -3.0, 1.0, -1.0])}
    cfg = CodecConfig(kind="int2", block=4)
    assert torch.equal(decode(encode(x, cfg), {"w": (8,)}, cfg)["w"], x["w"])


def test_sign_keeps_signs_and_each_blocks_mean_magnitude():
    """sign: every value comes back as its sign times its block's mean |value|; an all-zero
    block (a tensor that did not change) comes back as zeros, for int2 as well."""
    g = torch.Generator().manual_seed(3)
    x = {"w": torch.randn(5, 37, generator=g), "z": torch.zeros(3, 16)}
    cfg = CodecConfig(kind="sign", block=16)
    shapes = {k: v.shape for k, v in x.items()}
    y = decode(encode(x, cfg), shapes, cfg)
    flat, got = x["w"].reshape(-1), y["w"].reshape(-1)
    assert torch.equal(got >= 0, flat >= 0)
    for start in range(0, flat.numel(), 16):
        block = flat[start:start + 16]
        want = block.abs().sum() / 16  # the last block is padded with zeros before the mean
        torch.testing.assert_close(got[start:start + 16].abs(), want.expand(block.numel()))
    assert torch.equal(y["z"], x["z"])
    int2 = CodecConfig(kind="int2", block=16)
    assert torch.equal(decode(encode(x, int2), shapes, int2)["z"], x["z"])


def test_wire_sizes_shrink_as_promised():
    x = {"w": torch.randn(256, 256)}
    fp32 = len(tensor_bytes(encode(x, CodecConfig())))
    sizes = {k: len(tensor_bytes(encode(x, CodecConfig(kind=k, block=64))))
             for k in ("bf16", "int8", "int4", "int2", "sign")}
    assert fp32 / sizes["bf16"] == pytest.approx(2, rel=0.01)
    assert fp32 / sizes["int8"] == pytest.approx(4 / (1 + 4 / 64), rel=0.02)  # + a scale/block
    assert fp32 / sizes["int4"] == pytest.approx(8 / (1 + 8 / 64), rel=0.02)
    assert fp32 / sizes["int2"] == pytest.approx(16 / (1 + 16 / 64), rel=0.02)
    assert fp32 / sizes["sign"] == pytest.approx(32 / (1 + 32 / 64), rel=0.02)
    # 1/32 of each chunk of 256: 8 one-byte indices and 8 two-bit values (+ a scale per 64)
    top = encode(x, CodecConfig(kind="int2", topk=1 / 32))
    assert sum(t.numel() * t.element_size() for t in top.values()) == 2048 + 512 + 32 * 4
    assert len(tensor_bytes(top)) < 2688 + 300  # + the safetensors header of three parts


@pytest.mark.parametrize("spec", ["int4/32+top0.05", "int8/64", "bf16+top0.1", "int2/64",
                                  "int2/64+top0.1", "int2/64+rand0.25", "sign/64"])
def test_error_feedback_sum_of_decoded_follows_sum_of_true(spec):
    """Deltas with a steady drift plus noise: with error feedback the decoded updates add up
    to the true total, the relative error shrinking like 1/rounds (a quarter at four times
    the rounds). Without it, what the codec drops is lost: the error of the sum shrinks at
    best like 1/sqrt(rounds) (half), when the rounding errors of a dense codec average out,
    and not at all where the codec drops the same part every round (top-k, random places,
    sign: the drift's small entries, or its magnitudes)."""
    cfg = parse_spec(spec)
    g = torch.Generator().manual_seed(0)
    drift = torch.randn(300, generator=g) * 0.01
    ef = ErrorFeedback()
    true_sum = torch.zeros(300)
    ef_sum, plain_sum = torch.zeros(300), torch.zeros(300)
    rel = lambda s: ((s - true_sum).norm() / true_sum.norm()).item()  # noqa: E731
    for t in range(200):
        delta = {"w": drift + torch.randn(300, generator=g) * 0.02}
        true_sum += delta["w"]
        ef_sum += decode(ef.encode(delta, cfg, seed=t), {"w": (300,)}, cfg, seed=t)["w"]
        plain_sum += decode(encode(delta, cfg, seed=t), {"w": (300,)}, cfg, seed=t)["w"]
        if t == 49:
            early, early_plain = rel(ef_sum), rel(plain_sum)
    # the gap is exactly the last residual (up to float sums), one round's error in size
    torch.testing.assert_close(true_sum - ef_sum, ef.residual["w"], rtol=0, atol=1e-5)
    assert rel(ef_sum) < 0.05 and rel(ef_sum) < early / 3  # shrinking like 1/rounds
    assert rel(plain_sum) > early_plain / 2.5  # at best like 1/sqrt(rounds)
    if cfg.topk or cfg.kind == "sign":
        assert rel(plain_sum) > 0.9 * early_plain  # not at all
    assert rel(ef_sum) < rel(plain_sum) / 10


def test_error_feedback_decay_fades_what_stays_unsent():
    """feedback_decay b: each round sends Q(delta + b * residual), keeps the rest; checked
    against the same recursion computed by hand with the plain codec."""
    cfg = CodecConfig(kind="int2", topk=0.1, block=8)
    g = torch.Generator().manual_seed(1)
    ef, residual = ErrorFeedback(), torch.zeros(512)
    for _ in range(5):
        delta = torch.randn(512, generator=g)
        send = delta + 0.5 * residual
        expect = decode(encode({"w": send}, cfg), {"w": (512,)}, cfg)["w"]
        got = decode(ef.encode({"w": delta}, cfg, decay=0.5), {"w": (512,)}, cfg)["w"]
        torch.testing.assert_close(got, expect, rtol=0, atol=0)
        residual = send - expect
        torch.testing.assert_close(ef.residual["w"], residual, rtol=0, atol=0)
    with pytest.raises(ValueError, match="feedback_decay"):
        CodecConfig(feedback_decay=0.0).check()


@pytest.mark.parametrize("mangle, reason", [
    (lambda e: e.pop("::q"), "packed part 'q' is missing"),
    (lambda e: e.__setitem__("::q", e["::q"][:-1]), r"has shape \(31,\), expected \(32,\)"),
    (lambda e: e.__setitem__("::scale", e["::scale"].double()), "torch.float64"),
    (lambda e: e.__setitem__("extra", torch.zeros(1)), "unexpected tensor 'extra'"),
    (lambda e: e.__setitem__("::idx", e["::idx"] + 30), "'w': top-k index .* out of range "
                                                         "for chunks of 40"),
    (lambda e: e.__setitem__("::idx", e["::idx"].int()), "torch.int32, expected torch.uint8"),
])
def test_corrupt_payloads_are_refused_with_a_reason(mangle, reason):
    cfg = CodecConfig(kind="int8", topk=0.5, block=8)
    enc = encode({"w": torch.randn(40), "b": torch.randn(3)}, cfg)
    mangle(enc)
    with pytest.raises(WireError, match=reason):
        decode(enc, {"w": (40,), "b": (3,)}, cfg)


@pytest.mark.parametrize("mangle, reason", [
    (lambda e: e.pop("w::val"), "tensor 'w': part 'val' is missing"),
    (lambda e: e.__setitem__("w::val", e["w::val"][:-1]), "tensor 'w': part 'val' has shape"),
])
def test_corrupt_whole_tensors_are_refused_with_a_reason(mangle, reason):
    enc = encode({"w": torch.randn(40)}, CodecConfig(kind="bf16"))
    mangle(enc)
    with pytest.raises(WireError, match=reason):
        decode(enc, {"w": (40,)}, CodecConfig(kind="bf16"))


def test_unknown_codec_spec():
    with pytest.raises(WireError, match="unknown codec"):
        parse_spec("int3/64")


def test_federation_with_compressed_traffic(demo_data, tmp_path):
    """int4 + error feedback up, bf16 down: real serialized sizes shrink, training works."""
    plain = small_config(demo_data, ["code", "speeches"], federation={"rounds": 2})
    packed = small_config(demo_data, ["code", "speeches"], federation={"rounds": 2},
                          comm={"up": {"kind": "int4", "block": 64}, "down": {"kind": "bf16"}})
    a = simulate(plain, tmp_path / "a", report=False)
    b = simulate(packed, tmp_path / "b", report=False)
    rounds = lambda p: [r for r in read_metrics(p / "metrics.jsonl")  # noqa: E731
                        if r["kind"] == "round" and r["round"] > 0]
    ra, rb = rounds(tmp_path / "a"), rounds(tmp_path / "b")
    assert ra[-1]["bytes_up"] / rb[-1]["bytes_up"] > 6.5
    assert ra[-1]["bytes_down"] / rb[-1]["bytes_down"] > 1.9
    assert rb[-1]["sites"] == ["code", "speeches"]
    loss = lambda run: sum(run.final_losses()["federation"].values())  # noqa: E731
    assert loss(b) < 1.05 * loss(a)


def _rounds(out):
    return [r for r in read_metrics(out / "metrics.jsonl")
            if r["kind"] == "round" and r["run"] == "federation" and r["round"] > 0]


def test_delta_downlink_in_fp32_is_the_plain_downlink(demo_data, tmp_path):
    """Changes sent losslessly: every round the copy the sites train from is exactly the
    copy they held plus the exact change, ``old + (global - old)``, which is the global
    weights the plain downlink sends up to one float rounding of that sum (none where old
    and global are within a factor 2: Sterbenz). Also for a site that missed a round and
    gets the copy whole. (The two runs then drift apart by more: AdamW's first steps
    magnify differences of one ulp.)"""
    from atoll.engines.local import LocalEngine
    from atoll.federation.rounds import run_round

    names = ["code", "scripture", "speeches"]
    cfg = small_config(demo_data, names, federation={"rounds": 4, "sites_per_round": 2},
                       comm={"down": {"kind": "fp32", "delta": True}})
    run = Run(cfg, tmp_path / "run")
    sites = {n: Site(n, demo_data[n], tmp_path / "state" / n) for n in names}
    engine = LocalEngine(list(sites.values()))
    coord, taken = run.coordinator, []
    try:
        for _ in range(4):
            weights = {n: w.clone() for n, w in coord.weights.items()}
            last = coord.downlink.held  # the copy the sites of the last round hold
            old = None if last is None else {n: w.clone() for n, w in last.items()}
            report = run_round(coord, engine)
            assert sorted(report.outcome.accepted) == sorted(report.outcome.planned), report
            held = coord.downlink.held
            for n, w in weights.items():
                want = w if old is None else old[n] + (w - old[n])
                assert torch.equal(held[n], want), n
                if old is not None:  # the rounding of old + change, at most
                    assert ((held[n] - w).abs() <= 2**-23 * (old[n].abs() + w.abs())).all()
            for s in report.outcome.accepted:
                assert all(torch.equal(sites[s].anchor[n], held[n]) for n in held), s
            taken.append(set(report.outcome.accepted))
    finally:
        engine.close()
        run.close()
    # some site had not taken part in the round before: it got the copy whole
    assert any(now - before for before, now in zip(taken, taken[1:], strict=False))


def test_delta_downlink_int4_shrinks_the_downlink_and_keeps_training(demo_data, tmp_path):
    """int4 changes down: ~7x fewer bytes than whole fp32 weights; the copy the sites hold
    stays within one round's quantisation error of the global weights; loss as good."""
    sites = ["code", "scripture", "speeches"]
    fed = {"rounds": 4, "sites_per_round": 2}
    plain = simulate(small_config(demo_data, sites, federation=fed), tmp_path / "a",
                     report=False)
    packed = simulate(small_config(demo_data, sites, federation=fed,
                                   comm={"down": {"kind": "int4", "delta": True}}),
                      tmp_path / "b", report=False)
    ra, rb = _rounds(tmp_path / "a"), _rounds(tmp_path / "b")
    assert all(not r["rejected"] for r in rb)
    whole = ra[0]["bytes_down"] / 2  # one plan with the weights in fp32
    assert rb[0]["bytes_down"] / 2 == pytest.approx(whole, rel=0.01)  # nobody holds a copy
    for prev, r in zip(rb, rb[1:], strict=False):
        kept = set(r["sites"]) & set(prev["sites"])  # these get changes, the other the copy
        assert kept, r
        change = (r["bytes_down"] - (2 - len(kept)) * whole) / len(kept)
        assert whole / change > 6, (whole, change)
    c = packed.coordinator
    gap = max((c.weights[n] - c.downlink.held[n]).abs().max().item() for n in c.weights)
    step = max((c.weights[n] - plain.coordinator.weights[n]).abs().max().item()
               for n in c.weights)
    assert 0 < gap < 0.05 and step < 0.1
    loss = lambda run: sum(run.final_losses()["federation"].values())  # noqa: E731
    assert loss(packed) < 1.03 * loss(plain)


def test_a_site_without_the_base_weights_refuses_changes(demo_data, tmp_path):
    cfg = small_config(demo_data, ["code"], comm={"down": {"kind": "int8", "delta": True}})
    run = Run(cfg, tmp_path / "run")
    plan = run.coordinator.open_round(["code"])["code"]
    plan.base = 7  # as if the site held round 7's weights
    site = Site("code", demo_data["code"], tmp_path / "state")
    with pytest.raises(ValueError, match="holds the weights of round none.*against round 7"):
        site.run(plan)
    run.close()


def test_delta_downlink_needs_no_streaming():
    with pytest.raises(ValueError, match="does not combine with streaming"):
        from_dict(RunConfig, {"federation": {"fragments": 2},
                              "comm": {"down": {"kind": "int8", "delta": True}}}).check()


@pytest.mark.parametrize("up", [{"kind": "int2", "topk": 0.05, "select": "top"},
                                {"kind": "int2", "topk": 0.05, "select": "random"},
                                {"kind": "sign", "block": 64}])
def test_lossy_codecs_both_ways_keep_site_and_coordinator_in_step(demo_data, tmp_path, up):
    """One site, FedAvg, sparse 2-bit (or 1-bit sign) updates up and changes down in the
    same codec, through the real wire form. Every round the site trains from exactly the
    copy the coordinator keeps of it, and the global weights move by exactly what the site
    sent: global - (trained + site residual) = last global - (copy trained from + last site
    residual). Values put in the wrong places (random places: a seed the two ends do not
    share) break both."""
    from atoll.engines.local import LocalEngine
    from atoll.federation.rounds import run_round

    cfg = small_config(demo_data, ["code"], outer={"lr": 1.0, "momentum": 0.0,
                                                  "nesterov": False},
                       comm={"up": up, "down": {**up, "delta": True}})
    run = Run(cfg, tmp_path / "run")
    site = Site("code", demo_data["code"], tmp_path / "state")
    engine = LocalEngine([site])
    coord = run.coordinator
    last = {n: w.clone() for n, w in coord.weights.items()}
    residual = {n: torch.zeros_like(w) for n, w in last.items()}
    try:
        for _ in range(4):
            report = run_round(coord, engine)
            assert report.outcome.accepted == ["code"], report.outcome.rejected
            trained = dict(site.model.named_parameters())
            for n, w in coord.weights.items():
                torch.testing.assert_close(site.anchor[n], coord.downlink.held[n],
                                           atol=1e-6, rtol=0)
                gap = w - trained[n].detach() - site.feedback.residual[n]
                torch.testing.assert_close(gap, last[n] - site.anchor[n] - residual[n],
                                           atol=1e-6, rtol=0)
            last = {n: w.clone() for n, w in coord.weights.items()}
            residual = {n: r.clone() for n, r in site.feedback.residual.items()}
        assert max((w - coord.downlink.held[n]).abs().max().item()
                   for n, w in coord.weights.items()) > 0  # the downlink did drop some
    finally:
        engine.close()
        run.close()
