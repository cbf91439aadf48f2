"""kernels.sampling (the triton backend's draw: thresholds by search, Gumbel-max with Philox noise)
against kernels.reference's sort-based thresholds and the same noise, and the reference's
distribution against transformers' filters."""

import pytest
import torch
import triton
import triton.language as tl

from qruntime.engine.sampler import SamplingParams
from qruntime.kernels import reference as R
from qruntime.kernels import sampling
from qruntime.kernels.argmax import KEY_MIN
from qruntime.kernels.sampling import BLOCK, SamplingPlan, reseed, sample_token, sampling_workspace
from hf_sampling import hf_filtered


@pytest.fixture(autouse=True)
def small_candidate_buffer(monkeypatch):
    """The candidates' buffer cut from 1024 to 16 entries, and the small sort from 128 to 8: Triton's
    interpreter takes ~4 s for one tl.sort of 1024 words, and at 16 the draws here take both paths
    (tiny vocabularies and sharp heads fit, the rest falls back to the searches), with both sorts."""
    monkeypatch.setattr(sampling, "CAP", 16)
    monkeypatch.setattr(sampling, "SMALL", 8)
    monkeypatch.setenv("QRUNTIME_SAMPLING_CANDIDATES", "1")


@triton.jit
def _rand_kernel(out_ptr, offsets_ptr, seed, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, tl.rand(seed, tl.load(offsets_ptr + i)))


@pytest.mark.parametrize("seed", [0, 7, 2 ** 40 + 12345], ids=["seed0", "seed7", "seed-64-bit"])
def test_philox_uniform_is_tl_rand(seed):
    """The reference's noise is Triton's, bit for bit, over offsets past 2^32 (the draw's counter
    is step * V + token)."""
    offsets = torch.tensor([0, 1, 2, 1000, 2 ** 31 - 1, 2 ** 31, 2 ** 32 + 5, 37 * 128256 + 99] * 2, dtype=torch.int64)
    offsets[8:] += 2 ** 33 + 3
    out = torch.full((16,), float("nan"))
    _rand_kernel[(1,)](out, offsets, seed, N=16)
    ref = R.philox_uniform(seed, offsets)
    assert torch.equal(out, ref), (out, ref)
    assert ((ref >= 0) & (ref < 1)).all() and ref.unique().numel() == 16


PLANS = {  # SamplingParams -> what the chain runs
    "top-k": SamplingParams(temperature=0.8, top_k=5),
    "top-k-1": SamplingParams(temperature=1.0, top_k=1),
    "top-p": SamplingParams(temperature=0.7, top_p=0.9),
    "top-p-wide": SamplingParams(temperature=1.5, top_p=0.99),
    "top-k-then-top-p": SamplingParams(temperature=1.2, top_k=40, top_p=0.8, repetition_penalty=1.3),
    "temperature-only": SamplingParams(temperature=1.0),
    "greedy-penalty": SamplingParams(repetition_penalty=1.5),
}


def _logits(v: int, ties: bool) -> torch.Tensor:
    x = torch.randn(v, generator=torch.Generator().manual_seed(v)) * 1.5
    return torch.round(x * 4) / 4 if ties else x  # ties: many equal values, at the thresholds too


def _seen(v: int) -> torch.Tensor:
    seen = torch.zeros(v, dtype=torch.bool)
    seen[::3] = True
    return seen


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("v", [1, 7, 1000, 2 * BLOCK + 77], ids=lambda v: f"V{v}")
@pytest.mark.parametrize("name", list(PLANS))
def test_draws_match_reference(name, v, ties):
    """Three successive draws on one workspace: the threshold the searches reach is the sort-based
    reference's (the k-th largest value; top-p's smallest kept value), the token is the reference's
    for that step, and every launch leaves the workspace ready for the next one."""
    plan = SamplingPlan.from_params(PLANS[name], v)
    logits, seen = _logits(v, ties), _seen(v)
    ws = sampling_workspace(v, "cpu", seed=2 ** 35 + 11)
    token = torch.full((1,), -5, dtype=torch.int64)
    filtered = plan.top_k or plan.top_p < 1.0
    for step in range(3):
        mask = seen.clone()
        sample_token(logits, token, ws, plan, mask if plan.penalized else None)
        expected = R.sample_token(logits, plan, 2 ** 35 + 11, step, seen)
        assert int(token) == expected, (step, int(token), expected)
        if filtered:
            threshold = R.sampling_threshold(R.sampling_scaled_logits(logits, plan, seen), plan)
            assert ws.threshold == threshold
        if plan.penalized:  # the drawn token is marked for the next step's penalty, nothing else
            expected_mask = seen.clone()
            expected_mask[expected] = True
            assert torch.equal(mask, expected_mask)
        # arrival counter and argmax key idle, step advanced, the bands' counts reset
        assert ws.state[2:4].tolist() == [0, KEY_MIN] and int(ws.state[5]) == step + 1 and int(ws.state[7]) == 0


def _banded_logits(v: int, band0: list[float], band1: int, band2: int, rest: float = -40.0) -> torch.Tensor:
    """Logits with max 0: the values band0, band1 tokens at -6 (within 8 of the max), band2 at -12
    (within 16), the rest at `rest`; spread over the vocabulary's programs (slots claimed by each)."""
    x = torch.full((v,), rest)
    values = band0 + [-6.0] * band1 + [-12.0] * band2
    x[torch.randperm(v, generator=torch.Generator().manual_seed(len(values)))[:len(values)]] = torch.tensor(values)
    return x


# (band 0's values, band 1's and band 2's sizes, other tokens' value), the plan, whether the
# candidates serve it: with CAP = 16 the three bands fit, or the first two, or the first alone
BAND_CASES = {
    "three-bands-top-k": (([0.0, -0.5, -1.0, -1.5, -2.0], 5, 5, -40.0), dict(top_k=12), True),
    "two-bands-top-k": (([0.0, -0.5, -1.0, -1.5, -2.0], 5, 10, -40.0), dict(top_k=8), True),
    "first-band-top-k": (([0.0, -0.5, -1.0, -1.5, -2.0, -2.5], 12, 3, -40.0), dict(top_k=3), True),
    "first-band-top-p": (([0.0, 0.0, 0.0], 0, 2000, -40.0), dict(top_p=0.9), True),
    "too-few-for-top-k": (([0.0, -0.5, -1.0, -1.5, -2.0, -2.5], 12, 3, -40.0), dict(top_k=8), False),
    "mass-short-of-top-p": (([0.0, 0.0, 0.0], 0, 2000, -40.0), dict(top_p=0.999), False),  # band 2 holds 0.4%
    "no-band-fits": (([-0.1 * i for i in range(20)], 0, 0, -40.0), dict(top_k=1), False),
    "three-bands-top-k-then-top-p": (([0.0, -0.5, -1.0, -1.5, -2.0], 5, 5, -30.0), dict(top_k=14, top_p=0.5), True),
    # fewer than k tokens in the prefix (3 of 100): top-p's crossing is there whatever the mass
    # outside it (2000 tokens at -12, top-k's ties, 0.8% of the whole), or it depends on that mass
    # (the prefix's own mass would put it at -2, top-k's survivors' put it at -12)
    "top-k-beyond-prefix-top-p-sure": (([0.0, -1.0, -2.0], 0, 2000, -40.0), dict(top_k=100, top_p=0.9), True),
    "top-k-beyond-prefix-top-p-unsure": (([0.0, -1.0, -2.0], 0, 2000, -40.0), dict(top_k=100, top_p=0.9997), False),
}


@pytest.mark.parametrize("case", list(BAND_CASES))
def test_candidates_or_search(case):
    """The candidate path serves a draw exactly when its thresholds lie in the widest prefix of
    bands that fits CAP (16 here), and gives the searches' threshold and token either way:
    two successive draws on one workspace, each against the sort-based reference."""
    (band0, band1, band2, rest), filters, served = BAND_CASES[case]
    v = 2 * BLOCK + 77
    logits = _banded_logits(v, band0, band1, band2, rest)
    plan = SamplingPlan.from_params(SamplingParams(temperature=1.0, **filters), v)
    ws = sampling_workspace(v, "cpu", seed=21)
    assert ws.candidates.shape == (3, 16)
    token = torch.full((1,), -5, dtype=torch.int64)
    threshold = R.sampling_threshold(R.sampling_scaled_logits(logits, plan, None), plan)
    for step in range(2):
        sample_token(logits, token, ws, plan)
        assert ws.drew_from_candidates == served, step
        assert int(token) == R.sample_token(logits, plan, 21, step), step
        assert ws.threshold == threshold, (step, ws.threshold, threshold)
        assert int(ws.state[7]) == 0 and int(ws.state[5]) == step + 1


def test_candidates_switch(monkeypatch):
    """The candidates are on by default; QRUNTIME_SAMPLING_CANDIDATES=0 leaves every draw to the
    searches (a draw the candidates serve otherwise), with the same token and threshold."""
    (band0, band1, band2, rest), filters, _ = BAND_CASES["three-bands-top-k"]
    v = 2 * BLOCK + 77
    logits = _banded_logits(v, band0, band1, band2, rest)
    plan = SamplingPlan.from_params(SamplingParams(temperature=1.0, **filters), v)
    tokens = {}
    for switch in ("unset", "1", "0"):
        if switch == "unset":
            monkeypatch.delenv("QRUNTIME_SAMPLING_CANDIDATES")
        else:
            monkeypatch.setenv("QRUNTIME_SAMPLING_CANDIDATES", switch)
        ws, token = sampling_workspace(v, "cpu", seed=4), torch.zeros(1, dtype=torch.int64)
        sample_token(logits, token, ws, plan)
        assert ws.drew_from_candidates == (switch != "0")
        tokens[switch] = (int(token), ws.threshold)
    assert tokens["unset"] == tokens["1"] == tokens["0"] == (R.sample_token(logits, plan, 4, 0), -12.0)


def test_filters_keep_what_transformers_keeps():
    """The threshold keeps exactly transformers' surviving tokens (top-k ties included), over many
    random logits; and top-k 1 draws the argmax every time."""
    for i in range(12):
        v = 300
        logits = torch.randn(v, generator=torch.Generator().manual_seed(i)) * (0.5 + i / 4)
        seen = torch.randperm(v, generator=torch.Generator().manual_seed(100 + i))[:20]
        mask = torch.zeros(v, dtype=torch.bool)
        mask[seen] = True
        params = SamplingParams(temperature=0.5 + i / 8, top_k=(0, 10, 150)[i % 3], top_p=(0.95, 0.6, 1.0, 0.3)[i % 4],
                                repetition_penalty=(1.0, 1.2)[i % 2])
        plan = SamplingPlan.from_params(params, v)
        if not (plan.top_k or plan.top_p < 1.0):
            continue
        ws = sampling_workspace(v, "cpu", seed=i)
        token = torch.zeros(1, dtype=torch.int64)
        sample_token(logits, token, ws, plan, mask.clone() if plan.penalized else None)
        scaled = R.sampling_scaled_logits(logits, plan, mask)
        kept = scaled >= ws.threshold
        hf = hf_filtered(logits, params.temperature, params.top_k, params.top_p, params.repetition_penalty, seen)
        assert torch.equal(kept, hf > -float("inf")), i
        assert bool(kept[int(token)])
    logits = torch.randn(1000)
    ws, token = sampling_workspace(1000, "cpu", seed=5), torch.zeros(1, dtype=torch.int64)
    for _ in range(3):
        sample_token(logits, token, ws, SamplingPlan.from_params(SamplingParams(temperature=2.0, top_k=1), 1000))
        assert int(token) == int(torch.argmax(logits))


# 6, 9, 3 and 19 tokens survive the filters (at 3x these logits the first two kept one token)
@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [(0.7, 10, 0.9, 1.3), (1.3, 0, 0.5, 1.0), (1.0, 3, 1.0, 0.8),
                                                            (2.0, 20, 0.95, 1.2)])
def test_reference_distribution_matches_transformers(temperature, top_k, top_p, penalty):
    """The draw's distribution (Gumbel-max over the kept tokens, Philox noise) is transformers':
    4000 of the reference's draws, which the kernel's equal (test_draws_match_reference)."""
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    seen = torch.tensor([1, 5, 7, 7])
    mask = torch.zeros(50, dtype=torch.bool)
    mask[seen] = True
    ref = hf_filtered(logits, temperature, top_k, top_p, penalty, seen).softmax(-1)
    plan = SamplingPlan.from_params(SamplingParams(temperature, top_k, top_p, penalty), 50)
    counts = torch.zeros(50)
    for step in range(4000):
        counts[R.sample_token(logits, plan, 1234, step, mask)] += 1
    assert torch.all(counts[ref == 0] == 0), "sampled a token the filters remove"
    assert (counts / counts.sum() - ref).abs().max() < 0.03


def test_reseed_repeats_the_draws():
    v = 500
    logits = torch.randn(v)
    plan = SamplingPlan.from_params(SamplingParams(temperature=1.0, top_p=0.95), v)
    ws, token = sampling_workspace(v, "cpu", seed=3), torch.zeros(1, dtype=torch.int64)

    def draws():
        out = []
        for _ in range(4):
            sample_token(logits, token, ws, plan)
            out.append(int(token))
        return out

    first = draws()
    reseed(ws, 3)
    assert draws() == first
    reseed(ws, 4)
    assert draws() != first


def test_bad_arguments_are_refused():
    ws, token = sampling_workspace(10, "cpu"), torch.zeros(1, dtype=torch.int64)
    plan = SamplingPlan.from_params(SamplingParams(temperature=1.0), 10)
    with pytest.raises(ValueError, match="fp32"):
        sample_token(torch.zeros(10, dtype=torch.float16), token, ws, plan)
    with pytest.raises(ValueError, match="10 values"):
        sample_token(torch.zeros(11), token, ws, plan)
    with pytest.raises(ValueError, match="int64"):
        sample_token(torch.zeros(10), torch.zeros(1, dtype=torch.int32), ws, plan)
    with pytest.raises(ValueError, match="seen"):
        sample_token(torch.zeros(10), token, ws, SamplingPlan.from_params(SamplingParams(repetition_penalty=1.1), 10))
    with pytest.raises(ValueError, match="vocab"):
        sampling_workspace(0, "cpu")
