"""Sampling a token on the device without a sort: the triton backend's draw after a decode step.

Why: torch's ops for top-k / top-p over a 128256-word vocabulary are slow single-row kernels: on an
H200, torch.sort took 90 us, torch.topk 110 us, a softmax 34 us and an argmax 27 us, so a draw with
Llama 3's defaults (temperature 0.6, top-p 0.9) added 0.26 ms to every token, as much as a 1B model's
whole decode step (results/h200/sampling_probe.log). Here a draw is a chain of small multi-program
launches, with no sort and no host sync, that a CUDA graph replays (65 us for that draw, 9 us with
no filter; 8B w4 samples at 1.33-1.34 ms/token against 1.63-1.65 before and 1.27 greedy:
results/h200/sampling_s33.log):

  1. prepare: l = logits with the repetition penalty, times 1 / temperature, stored; max(l).
  2. top-k, then top-p, each as a search for a threshold key: the largest t with F(t) >= target,
     where F(t) sums a weight over the tokens whose key is >= t (weight 1 and target k for top-k;
     weight exp(l - max l) and target top_p * F(start) for top-p, with the search starting at
     top-k's threshold so that top-p sees top-k's survivors only). Each pass splits the remaining
     range of 32-bit keys into SEARCH_BINS parts and evaluates F at every split: SEARCH_PASSES
     passes reach a single key. F changes only at the keys of actual values, so the result is the
     key of a real logit: the k-th largest for top-k; for top-p, the smallest kept value of
     transformers' TopPLogitsWarper (which keeps, in descending order, the tokens before the one
     whose predecessors' mass reaches top_p, that one included).
  Before the searches, a draw with a filter tries the candidates (candidates_enabled(): on unless
     QRUNTIME_SAMPLING_CANDIDATES=0): one launch sums the total mass and copies the tokens within
     BAND_WIDTHS of max(l) into three bands by their distance to it; its last program sorts the
     widest prefix of bands that fits CAP entries and, when the filters' thresholds fall inside it
     (top-k: at least k tokens there; top-p: the target mass reached there, and under top-k with
     fewer than k tokens there, reached at the same token whatever the mass of top-k's survivors
     outside it, which lies between none and the rest of the vocabulary's), finds them, draws
     itself and flags the step done, so the search passes and the draw launch return at once. A
     prefix of bands is every token above some value, a prefix of the whole vocabulary's order, so
     the thresholds found there are the global ones: the result is the searches' (the mass sums
     only add in another order). Else the searches run as before.
  3. draw: the Gumbel-max trick, argmax over kept tokens of l + G with G = -log(-log(U)) and U
     uniform from Philox (tl.rand) keyed by the seed, at counter step * V + token: the same
     distribution as softmax(l) over the kept tokens. The last program writes the token, marks it
     seen (repetition penalty) and advances the step.
Keys are the order-preserving int32 images of fp32 values (kernels.argmax.order_key); a token is
kept when its key is >= the threshold, so ties with the threshold are kept (as top-k does in
transformers; for top-p, transformers' sort decides between tied values, which floats rarely have).

Every launch ends the way greedy_advance does: programs merge into global memory with gpu-scope
acq_rel atomics, and the last to arrive (by a counter) finishes the step and leaves the workspace
ready for the next launch, so a graph replays the chain with no memset. Partial sums are added in a
fixed order by that last program, so the result does not depend on which program ran first.
The plain-PyTorch reference is kernels.reference.sample_token (same thresholds, same noise).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .argmax import KEY_MIN, key_value, order_key

BLOCK = 1024          # tokens per program: 126 programs for a 128256 vocabulary, about one an SM
SUB = 128             # tokens a program compares with all the splits at once ([SUB, SEARCH_BINS])
SEARCH_BINS = 64      # splits of the key range per pass (128 x 5 passes was 3x slower on an H200: ab_sampling_search_s34.log)
PARTS = 32            # programs' partial sums the last program adds up a load
SEARCH_PASSES = 6     # 64 ** 6 = 2 ** 36 > 2 ** 32 keys: the range is one key after six passes
NUM_WARPS = 4
# The candidate path: the tokens within 4, 8 and 16 of max(l) (after the temperature; exp(-16) is
# 1.1e-7 of the top token's weight) go into three bands, and one program sorts up to CAP of them
# (tl.sort of 1024 packed words took 8.2 us on an H200, probe_sampler_pieces.log, against 5-8 us a
# search pass). Each band's count is a 21-bit field of one int64 word, claimed by one atomic add, so
# the path serves vocabularies under 2^21 words (the searches alone serve larger ones).
BAND_WIDTHS = (4.0, 8.0, 16.0)
# on: 21-44 us a served draw against 55-104 for the searches alone, 5-6 us more a draw they do not
# serve (H100, results/h100/ab_sampling_candidates.log); QRUNTIME_SAMPLING_CANDIDATES=0 turns it off
CANDIDATES_DEFAULT = True
CAP = 1024
SMALL = 128  # a prefix of up to this many tokens is sorted in a sort of this size
COUNT_BITS = 21
CANDIDATE_VOCAB_LIMIT = 2 ** COUNT_BITS
INT32_MIN, INT32_MAX = tl.constexpr(-(2 ** 31)), tl.constexpr(2 ** 31 - 1)

# the int64 state words, and the float ones (constexpr: the kernels index with them)
LO, HI, COUNTER, BEST, SEED, STEP, DONE, BAND_COUNTS = (tl.constexpr(i) for i in range(8))
MAX_L, TARGET = tl.constexpr(0), tl.constexpr(1)


@dataclass
class SamplingWorkspace:
    """What the chain keeps on the device between its launches and between draws."""
    scaled: torch.Tensor     # fp32 [V]: the logits with the penalty and the temperature
    partials: torch.Tensor   # fp32 [programs, SEARCH_BINS]: each program's sums at the splits
    state: torch.Tensor      # int64 [8]: search range lo/hi, arrival counter, argmax key, seed, step,
    #                          done (the candidates served this draw), the bands' packed counts
    fstate: torch.Tensor     # fp32 [2]: max of scaled, top-p's target mass
    mass: torch.Tensor       # fp32 [programs]: each program's sum of exp(l - max l), for top-p's target
    candidates: torch.Tensor  # int64 [3, CAP]: the bands' (key << 32 | token) words

    @property
    def drew_from_candidates(self) -> bool:
        """Whether the last draw was served by the candidates (a sync: for tests and benchmarks)."""
        return bool(self.state[DONE.value])

    @property
    def threshold(self) -> float:
        """The kept tokens' smallest value after a search (key_value of its key, on the host; a
        sync: for tests and benchmarks)."""
        bits = int(self.state[LO.value]) & 0xFFFFFFFF
        if bits & 0x80000000:
            bits ^= 0x7FFFFFFF
        return struct.unpack("<f", struct.pack("<I", bits))[0]


def sampling_workspace(vocab: int, device: torch.device | str, seed: int = 0) -> SamplingWorkspace:
    """A workspace for a vocabulary of `vocab` words; the draws use Philox keyed by `seed`, from step 0."""
    if not 1 <= vocab < 2 ** 31:
        raise ValueError(f"sampling_workspace: vocab={vocab} must be in [1, 2**31)")
    state = torch.tensor([INT32_MIN.value, INT32_MAX.value, 0, KEY_MIN, 0, 0, 0, 0], device=device, dtype=torch.int64)
    programs = triton.cdiv(vocab, BLOCK)
    ws = SamplingWorkspace(scaled=torch.empty(vocab, device=device, dtype=torch.float32),
                           partials=torch.empty((programs, SEARCH_BINS), device=device, dtype=torch.float32),
                           state=state, fstate=torch.zeros(2, device=device, dtype=torch.float32),
                           mass=torch.empty(programs, device=device, dtype=torch.float32),
                           candidates=torch.empty((len(BAND_WIDTHS), CAP), device=device, dtype=torch.int64))
    reseed(ws, seed)
    return ws


def reseed(ws: SamplingWorkspace, seed: int) -> None:
    """Draws from here on use Philox keyed by `seed` (any int; its low 63 bits), from step 0."""
    ws.state[SEED.value] = seed & (2 ** 63 - 1)
    ws.state[STEP.value] = 0


@triton.jit
def _arrive_last(state_ptr):
    """Counts this program in; True for the last one of the launch (which must reset the counter)."""
    tl.debug_barrier()
    done = tl.atomic_add(state_ptr + COUNTER, 1, sem="acq_rel", scope="gpu")
    return done == tl.num_programs(0) - 1


@triton.jit
def _prepare_kernel(logits_ptr, seen_ptr, scaled_ptr, state_ptr, fstate_ptr, V, inv_t, penalty,
                    PENALTY: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < V
    x = tl.load(logits_ptr + offs, mask=ok, other=0.0)
    if PENALTY:  # transformers' RepetitionPenaltyLogitsProcessor: seen logits < 0 times it, else over it
        seen = tl.load(seen_ptr + offs, mask=ok, other=0) != 0
        x = tl.where(seen, tl.where(x < 0, x * penalty, x / penalty), x)
    x = x * inv_t
    tl.store(scaled_ptr + offs, x, mask=ok)
    key = tl.where(ok, order_key(x), INT32_MIN)
    tl.atomic_max(state_ptr + BEST, tl.max(key, axis=0).to(tl.int64), sem="acq_rel", scope="gpu")
    if _arrive_last(state_ptr):
        best = tl.atomic_xchg(state_ptr + BEST, -9223372036854775808, sem="acq_rel", scope="gpu").to(tl.int32)
        tl.store(fstate_ptr + MAX_L, key_value(best))
        tl.store(state_ptr + LO, INT32_MIN)   # the searches start from the whole key range
        tl.store(state_ptr + HI, INT32_MAX)
        tl.store(state_ptr + DONE, 0)
        tl.store(state_ptr + COUNTER, 0)


@triton.jit
def _search_kernel(scaled_ptr, partials_ptr, state_ptr, fstate_ptr, V, count_target, top_p,
                   MASS: tl.constexpr, FIRST: tl.constexpr, BINS: tl.constexpr, BLOCK: tl.constexpr,
                   SUB: tl.constexpr, PARTS: tl.constexpr):
    pid = tl.program_id(0)
    lo = tl.load(state_ptr + LO)
    hi = tl.load(state_ptr + HI)
    if FIRST:
        hi = tl.full([], INT32_MAX, tl.int64)  # the search starts at lo (the previous search's threshold) and goes up
    # nothing to do when the candidates served the draw, or the range is one key (every program returns)
    if (tl.load(state_ptr + DONE) == 0) & (lo < hi):
        step = (hi - lo + BINS) // BINS          # ceil((hi - lo + 1) / BINS): BINS splits cover the range
        bins = tl.arange(0, BINS)
        splits = lo + bins.to(tl.int64) * step
        # compared in 32 bits (the splits past hi, clamped here, are not used below)
        splits32 = tl.minimum(splits, INT32_MAX).to(tl.int32)
        top = tl.load(fstate_ptr + MAX_L)
        # one sum per (row, split), reduced across rows once at the end: a cross-warp reduction
        # per SUB rows made the pass several times slower
        acc = tl.zeros([SUB, BINS], dtype=tl.float32)
        for s in tl.static_range(0, BLOCK, SUB):
            offs = pid * BLOCK + s + tl.arange(0, SUB)
            ok = offs < V
            x = tl.load(scaled_ptr + offs, mask=ok, other=0.0)
            key = tl.where(ok, order_key(x), INT32_MIN)
            if MASS:
                w = tl.where(ok, tl.exp(x - top), 0.0)
            else:
                w = tl.where(ok, 1.0, 0.0)
            acc += tl.where(key[:, None] >= splits32[None, :], w[:, None], 0.0)
        tl.store(partials_ptr + pid * BINS + bins, tl.sum(acc, axis=0))
        if _arrive_last(state_ptr):
            # the programs' sums in a fixed order, whoever arrives last; L2 reads (.cg), as the
            # other programs wrote them; PARTS rows a load (one row a load cost 12 us a pass)
            total = tl.zeros([BINS], dtype=tl.float32)
            for p0 in range(0, tl.num_programs(0), PARTS):
                rows = p0 + tl.arange(0, PARTS)
                tile = tl.load(partials_ptr + rows[:, None] * BINS + bins[None, :],
                               mask=rows[:, None] < tl.num_programs(0), other=0.0, cache_modifier=".cg")
                total += tl.sum(tile, axis=0)
            if MASS:
                if FIRST:  # total[0] is the mass above the start: top-k's survivors (or all)
                    target = top_p * tl.sum(tl.where(bins == 0, total, 0.0), axis=0)
                    tl.store(fstate_ptr + TARGET, target)
                else:
                    target = tl.load(fstate_ptr + TARGET)
            else:
                target = count_target
            # F(lo) >= target holds (split 0); the last split that still reaches it is the new lo
            best = tl.max(tl.where((total >= target) & (splits <= hi), bins, 0), axis=0)
            new_lo = lo + best.to(tl.int64) * step
            tl.store(state_ptr + LO, new_lo)
            tl.store(state_ptr + HI, tl.minimum(new_lo + step - 1, hi))
            tl.store(state_ptr + COUNTER, 0)


@triton.jit
def _draw_kernel(scaled_ptr, state_ptr, token_ptr, seen_ptr, V, NOISE: tl.constexpr, FILTERED: tl.constexpr,
                 MARK_SEEN: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if tl.load(state_ptr + DONE) == 0:  # else the candidates drew this step's token
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        ok = offs < V
        x = tl.load(scaled_ptr + offs, mask=ok, other=0.0)
        if FILTERED:
            ok = ok & (order_key(x) >= tl.load(state_ptr + LO))
        if NOISE:
            x = _gumbel(x, offs.to(tl.int64), state_ptr, V)
        # kept tokens' keys sit above every removed one's (INT32_MIN is below -inf's image)
        hi = tl.where(ok, order_key(x), INT32_MIN)
        best_hi, best_i = tl.max(hi, axis=0, return_indices=True, return_indices_tie_break_left=True)
        index = (pid * BLOCK + best_i).to(tl.int64)
        tl.atomic_max(state_ptr + BEST, (best_hi.to(tl.int64) << 32) | (0xFFFFFFFF - index), sem="acq_rel", scope="gpu")
        if _arrive_last(state_ptr):
            final = tl.atomic_xchg(state_ptr + BEST, -9223372036854775808, sem="acq_rel", scope="gpu")
            _finish_draw(0xFFFFFFFF - (final & 0xFFFFFFFF), token_ptr, seen_ptr, state_ptr, MARK_SEEN)
            tl.store(state_ptr + COUNTER, 0)


@triton.jit
def _gumbel(x, tokens, state_ptr, V):
    """x + G, G = -log(-log(U)) with U from Philox keyed by the seed at counter step * V + token:
    argmax over tokens of x + G is token i with probability softmax(x)_i (Gumbel-max). U = 0 gives
    -inf: that token cannot win."""
    u = tl.rand(tl.load(state_ptr + SEED), tl.load(state_ptr + STEP) * V + tokens)
    return x - tl.log(-tl.log(u))


@triton.jit
def _finish_draw(token, token_ptr, seen_ptr, state_ptr, MARK_SEEN: tl.constexpr):
    """Writes the drawn token, marks it seen (repetition penalty) and advances the step."""
    tl.store(token_ptr, token)
    if MARK_SEEN:
        tl.store(seen_ptr + token, 1)
    tl.store(state_ptr + STEP, tl.load(state_ptr + STEP) + 1)


@triton.jit
def _candidates_kernel(scaled_ptr, mass_ptr, cand_ptr, state_ptr, fstate_ptr, token_ptr, seen_ptr, V, top_k, top_p,
                       width0, width1, width2, TOP_K: tl.constexpr, TOP_P: tl.constexpr, NOISE: tl.constexpr,
                       MARK_SEEN: tl.constexpr, CAP: tl.constexpr, SMALL: tl.constexpr, BLOCK: tl.constexpr,
                       COUNT_BITS: tl.constexpr, PARTS: tl.constexpr):
    """Each program: its sum of exp(l - max l) (top-p's whole mass, added up in order by the select),
    and its tokens within width2 of max l, copied into band 0 (within width0), 1 or 2, each at slots
    claimed by one atomic add of the three counts (COUNT_BITS-bit fields); slots past CAP are not
    written, but counted, so the select knows the band overflowed. The last program to arrive
    selects (_select)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < V
    x = tl.load(scaled_ptr + offs, mask=ok, other=0.0)
    top = tl.load(fstate_ptr + MAX_L)
    tl.store(mass_ptr + pid, tl.sum(tl.where(ok, tl.exp(x - top), 0.0), axis=0))
    below = top - x
    band = tl.where(below <= width0, 0, tl.where(below <= width1, 1, tl.where(below <= width2, 2, 3)))
    band = tl.where(ok, band, 3)
    in0, in1, in2 = (band == 0).to(tl.int32), (band == 1).to(tl.int32), (band == 2).to(tl.int32)
    counts = (tl.sum(in0, axis=0).to(tl.int64) | (tl.sum(in1, axis=0).to(tl.int64) << COUNT_BITS)
              | (tl.sum(in2, axis=0).to(tl.int64) << 2 * COUNT_BITS))
    base = tl.atomic_add(state_ptr + BAND_COUNTS, counts, sem="relaxed", scope="gpu")
    field = (1 << COUNT_BITS) - 1
    # slot within the band: the band's count before this program's, plus the token's rank in it here
    slot = tl.where(band == 0, (base & field) + tl.cumsum(in0, axis=0) - 1,
                    tl.where(band == 1, (base >> COUNT_BITS & field) + tl.cumsum(in1, axis=0) - 1,
                             (base >> 2 * COUNT_BITS & field) + tl.cumsum(in2, axis=0) - 1))
    word = (order_key(x).to(tl.int64) << 32) | offs.to(tl.int64)
    tl.store(cand_ptr + band.to(tl.int64) * CAP + slot, word, mask=(band < 3) & (slot < CAP))
    if _arrive_last(state_ptr):
        tl.store(state_ptr + COUNTER, 0)
        counts = tl.atomic_xchg(state_ptr + BAND_COUNTS, 0, sem="acq_rel", scope="gpu")  # reset for the next draw
        _select(counts, cand_ptr, mass_ptr, state_ptr, fstate_ptr, token_ptr, seen_ptr, V, tl.num_programs(0),
                top_k, top_p, TOP_K, TOP_P, NOISE, MARK_SEEN, CAP, SMALL, COUNT_BITS, PARTS)


@triton.jit
def _select(counts, cand_ptr, mass_ptr, state_ptr, fstate_ptr, token_ptr, seen_ptr, V, programs, top_k, top_p,
            TOP_K: tl.constexpr, TOP_P: tl.constexpr, NOISE: tl.constexpr, MARK_SEEN: tl.constexpr,
            CAP: tl.constexpr, SMALL: tl.constexpr, COUNT_BITS: tl.constexpr, PARTS: tl.constexpr):
    """Sorts the widest prefix of bands that fits CAP entries (in a sort of SMALL entries when it
    fits those); if the filters' thresholds lie inside it, draws the token there (the draw kernel's
    noise and order) and sets DONE, with the threshold in LO as the searches would leave it."""
    field = (1 << COUNT_BITS) - 1
    n0 = counts & field
    n1 = counts >> COUNT_BITS & field
    n2 = counts >> 2 * COUNT_BITS & field
    # the widest prefix of bands that fits: its end in bands 1 and 2 (past n, nothing is loaded)
    end1 = tl.where(n0 + n1 <= CAP, n0 + n1, n0)
    n = tl.where(n0 + n1 + n2 <= CAP, n0 + n1 + n2, end1)
    if n0 <= CAP:
        if n <= SMALL:
            _serve_from(cand_ptr, mass_ptr, state_ptr, fstate_ptr, token_ptr, seen_ptr, V, programs, top_k, top_p,
                        n0, n1, n, TOP_K, TOP_P, NOISE, MARK_SEEN, CAP, SMALL, PARTS)
        else:
            _serve_from(cand_ptr, mass_ptr, state_ptr, fstate_ptr, token_ptr, seen_ptr, V, programs, top_k, top_p,
                        n0, n1, n, TOP_K, TOP_P, NOISE, MARK_SEEN, CAP, CAP, PARTS)


@triton.jit
def _total_mass(mass_ptr, programs, PARTS: tl.constexpr):
    """The whole vocabulary's sum of exp(l - max l): the programs' sums added in program order."""
    total = 0.0
    for p0 in range(0, programs, PARTS):
        rows = p0 + tl.arange(0, PARTS)
        total += tl.sum(tl.load(mass_ptr + rows, mask=rows < programs, other=0.0, cache_modifier=".cg"), axis=0)
    return total


@triton.jit
def _serve_from(cand_ptr, mass_ptr, state_ptr, fstate_ptr, token_ptr, seen_ptr, V, programs, top_k, top_p, n0, n1, n,
                TOP_K: tl.constexpr, TOP_P: tl.constexpr, NOISE: tl.constexpr, MARK_SEEN: tl.constexpr,
                CAP: tl.constexpr, SIZE: tl.constexpr, PARTS: tl.constexpr):
    """The select's work on the n (<= SIZE) tokens of the bands' prefix, sorted in SIZE entries."""
    i = tl.arange(0, SIZE).to(tl.int64)
    src = tl.where(i < n0, i, tl.where(i < n0 + n1, CAP + i - n0, 2 * CAP + i - n0 - n1))
    valid = i < n
    # L2 reads (.cg): the other programs of the launch wrote them
    words = tl.load(cand_ptr + src, mask=valid, other=-9223372036854775808, cache_modifier=".cg")
    words = tl.sort(words, dim=0, descending=True)  # by value; the padding sorts last
    key = (words >> 32).to(tl.int32)
    token = words & 0xFFFFFFFF
    x = key_value(key)
    w = tl.where(valid, tl.exp(x - tl.load(fstate_ptr + MAX_L)), 0.0)
    served = n > 0
    threshold = tl.full([], INT32_MIN, tl.int32)
    if TOP_K:  # the k-th largest value, when the prefix holds k tokens
        enough = top_k <= n
        threshold = tl.max(tl.where(enough & (i == top_k - 1), key, INT32_MIN), axis=0)
        if not TOP_P:
            served = served & enough
    if TOP_P:  # the largest value whose tokens from the top reach top_p of the start's mass
        in_play = valid & (key >= threshold)
        kept_w = tl.where(in_play, w, 0.0)
        # the start's mass lies in [low, high]: top-k's survivors' when the prefix holds k tokens;
        # else they are the prefix and tokens outside it, so between the prefix's and the whole
        # vocabulary's mass (added in program order), as top-p alone has it
        if TOP_K:
            low = tl.sum(kept_w, axis=0)
            high = low
            if not enough:
                high = _total_mass(mass_ptr, programs, PARTS)
        else:
            low = _total_mass(mass_ptr, programs, PARTS)
            high = low
        # served when the crossing is the same under either: the threshold does not depend on the
        # mass outside the prefix (a confident step under top-k 20 then top-p: a few tokens hold it)
        mass_above = tl.cumsum(kept_w, axis=0)
        sure = in_play & (mass_above >= top_p * high)
        maybe = in_play & (mass_above >= top_p * low)
        threshold = tl.max(tl.where(sure, key, INT32_MIN), axis=0)
        same = threshold == tl.max(tl.where(maybe, key, INT32_MIN), axis=0)
        served = served & (tl.max(sure.to(tl.int32), axis=0) > 0) & same
    if served:
        kept = valid & (key >= threshold)
        if NOISE:
            x = _gumbel(x, token, state_ptr, V)
        best = tl.max(tl.where(kept, (order_key(x).to(tl.int64) << 32) | (0xFFFFFFFF - token),
                               -9223372036854775808), axis=0)
        _finish_draw(0xFFFFFFFF - (best & 0xFFFFFFFF), token_ptr, seen_ptr, state_ptr, MARK_SEEN)
        tl.store(state_ptr + LO, threshold.to(tl.int64))
        tl.store(state_ptr + DONE, 1)


def candidates_enabled() -> bool:
    """Whether draws with a filter try the candidates first: QRUNTIME_SAMPLING_CANDIDATES=1 or 0,
    else CANDIDATES_DEFAULT."""
    return os.environ.get("QRUNTIME_SAMPLING_CANDIDATES", "1" if CANDIDATES_DEFAULT else "0") != "0"


@dataclass(frozen=True)
class SamplingPlan:
    """What a draw does, from SamplingParams (transformers' order: penalty, temperature, top-k,
    top-p; greedy when the temperature is 0, and then no filter applies)."""
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float

    @classmethod
    def from_params(cls, params, vocab: int) -> "SamplingPlan":
        greedy = params.temperature == 0.0
        top_k = 0 if greedy or params.top_k >= vocab else params.top_k
        top_p = 1.0 if greedy else params.top_p
        return cls(params.temperature, top_k, top_p, params.repetition_penalty)

    @property
    def noise(self) -> bool:
        return self.temperature > 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0


def sample_token(logits: torch.Tensor, token: torch.Tensor, ws: SamplingWorkspace, plan: SamplingPlan,
                 seen: torch.Tensor | None = None) -> None:
    """token[0] = a draw from `logits` (fp32 [V] or [1, V], contiguous) under `plan`, in 2 launches
    without a filter, else 3 and SEARCH_PASSES more for each filter, and no host sync (CUDA-graph
    capturable). With a repetition penalty, `seen` (bool [V]) marks the tokens it applies to, and
    the drawn token is marked in it. The draw advances the workspace's step, so successive draws
    are independent."""
    v = ws.scaled.numel()
    if logits.dtype != torch.float32 or not logits.is_contiguous() or logits.numel() != v:
        raise ValueError(f"sample_token: logits must be contiguous fp32 with {v} values, got {logits.dtype} "
                         f"{tuple(logits.shape)} (contiguous={logits.is_contiguous()})")
    if token.dtype != torch.int64 or token.shape != (1,):
        raise ValueError(f"sample_token: token must be int64 [1], got {token.dtype} {tuple(token.shape)}")
    if plan.penalized and (seen is None or seen.dtype != torch.bool or seen.shape != (v,)):
        raise ValueError("sample_token: a repetition penalty needs `seen`, a bool [V] mask")
    grid = (triton.cdiv(v, BLOCK),)
    seen_u8 = seen.view(torch.uint8) if plan.penalized else ws.scaled  # not read without a penalty
    inv_t = 1.0 / plan.temperature if plan.noise else 1.0
    _prepare_kernel[grid](logits, seen_u8, ws.scaled, ws.state, ws.fstate, v, inv_t, plan.repetition_penalty,
                          PENALTY=plan.penalized, BLOCK=BLOCK, num_warps=NUM_WARPS)
    searches = ([(False, plan.top_k)] if plan.top_k else []) + ([(True, 0)] if plan.top_p < 1.0 else [])
    if searches and v < CANDIDATE_VOCAB_LIMIT and candidates_enabled():
        cap = ws.candidates.shape[1]  # the workspace's buffer (CAP when it was made)
        _candidates_kernel[grid](ws.scaled, ws.mass, ws.candidates, ws.state, ws.fstate, token, seen_u8, v,
                                 plan.top_k, plan.top_p, *BAND_WIDTHS, TOP_K=bool(plan.top_k), TOP_P=plan.top_p < 1.0,
                                 NOISE=plan.noise, MARK_SEEN=plan.penalized, CAP=cap, SMALL=min(SMALL, cap),
                                 BLOCK=BLOCK, COUNT_BITS=COUNT_BITS, PARTS=PARTS, num_warps=NUM_WARPS)
    for mass, k in searches:
        for i in range(SEARCH_PASSES):
            _search_kernel[grid](ws.scaled, ws.partials, ws.state, ws.fstate, v, float(k), plan.top_p,
                                 MASS=mass, FIRST=mass and i == 0, BINS=SEARCH_BINS, BLOCK=BLOCK, SUB=SUB,
                                 PARTS=PARTS, num_warps=NUM_WARPS)
    _draw_kernel[grid](ws.scaled, ws.state, token, seen_u8, v, NOISE=plan.noise, FILTERED=bool(searches),
                       MARK_SEEN=plan.penalized, BLOCK=BLOCK, num_warps=NUM_WARPS)
