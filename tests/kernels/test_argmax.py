"""kernels.argmax.greedy_advance: token = argmax(logits), pos += 1, seq_len += 1, in one launch,
compared with torch.argmax (first index of the max; NaN counts as the max)."""

import pytest
import torch

from qruntime.kernels.argmax import BLOCK, KEY_MIN, greedy_advance, greedy_workspace


class State:
    """token/pos/seq_len as the runner holds them, plus a reused workspace."""

    def __init__(self, pos: int = 10):
        self.token = torch.full((1,), -7, dtype=torch.int64)  # garbage: must be overwritten
        self.pos = torch.tensor([pos], dtype=torch.int32)
        self.seq_len = torch.tensor([pos + 1], dtype=torch.int32)
        self.ws = greedy_workspace("cpu")

    def advance(self, logits: torch.Tensor, block: int = BLOCK) -> int:
        pos, seq_len = int(self.pos), int(self.seq_len)
        greedy_advance(logits, self.token, self.pos, self.seq_len, self.ws, block=block)
        assert (int(self.pos), int(self.seq_len)) == (pos + 1, seq_len + 1)
        # the last program left the workspace idle, ready for the next launch without a memset
        assert int(self.ws.best_key) == KEY_MIN and int(self.ws.counter) == 0
        return int(self.token)


def check(logits: torch.Tensor, block: int = BLOCK) -> None:
    got = State().advance(logits, block)
    assert got == int(torch.argmax(logits)), (got, int(torch.argmax(logits)))


LENGTHS = [1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 128256]


@pytest.mark.parametrize("v", LENGTHS, ids=lambda v: f"V{v}")
def test_random_logits(v):
    g = torch.Generator().manual_seed(v)
    check(torch.randn(v, generator=g) * 10)


def test_batch_row_shape_and_vocab_scale():
    g = torch.Generator().manual_seed(1)
    check(torch.randn(1, 128256, generator=g))  # the runner's logits buffer: [1, V]


@pytest.mark.parametrize("where", [
    [5, 9, 4000],                               # one block
    [BLOCK + 3, 2, 3 * BLOCK],                  # first occurrence in block 0, later ones after it
    [3 * BLOCK + 1, BLOCK + 17, 2 * BLOCK - 1],  # first occurrence in a middle block
], ids=["same-block", "first-in-block0", "first-in-middle-block"])
def test_ties_first_index_wins(where):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3 * BLOCK + 5, generator=g)  # values in [0, 1)
    x[where] = 3.0
    check(x)
    assert State().advance(x) == min(where)


def test_ties_across_many_small_blocks():
    """block=16: hundreds of programs merge keys with the same value part."""
    x = torch.full((1000,), 2.5)
    x[::3] = -1.0
    check(x, block=16)
    x[[999, 500, 17, 18]] = 9.0
    check(x, block=16)


def test_all_negative():
    g = torch.Generator().manual_seed(3)
    x = -torch.rand(2 * BLOCK + 9, generator=g) * 100 - 1
    check(x)
    x[BLOCK + 4] = -0.5  # the largest of the negatives, in block 1
    assert State().advance(x) == BLOCK + 4


def test_negative_ordering_is_by_magnitude():
    """More negative sorts lower: the key flips the non-sign bits of negative floats."""
    x = torch.tensor([-3.0, -1e-30, -2.0, -1e30, -1.5e-45])  # -1.5e-45: the smallest subnormal
    check(x)
    assert State().advance(x) == 4


def test_signed_zeros_tie():
    """-0.0 == +0.0: the first one wins whichever sign it has."""
    check(torch.tensor([-1.0, -0.0, 0.0, -2.0]))
    check(torch.tensor([-1.0, 0.0, -0.0, -2.0]))
    x = torch.full((BLOCK + 10,), -1.0)
    x[BLOCK + 5], x[7] = 0.0, -0.0
    check(x)


def test_inf_entries():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2 * BLOCK + 1, generator=g)
    x[::5] = float("-inf")
    check(x)
    x[BLOCK + 2] = float("inf")
    x[2 * BLOCK] = float("inf")
    check(x)
    assert State().advance(x) == BLOCK + 2


def test_all_neg_inf_gives_index_0():
    check(torch.full((3 * BLOCK + 5,), float("-inf")))
    check(torch.full((1,), float("-inf")))


def test_extremes():
    x = torch.tensor([3.4028235e38, -3.4028235e38, 1e-45, 0.0, 3.4028234e38])
    check(x)


def test_nan_wins():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3 * BLOCK + 5, generator=g)
    x[BLOCK + 1] = float("inf")
    x[2 * BLOCK + 7] = float("nan")
    check(x)
    assert State().advance(x) == 2 * BLOCK + 7


def test_first_nan_wins_and_negative_nan():
    x = torch.full((3 * BLOCK + 5,), float("-inf"))
    x[3 * BLOCK] = float("nan")
    # a NaN with the sign bit set (its raw bits would sort below every negative float)
    x[BLOCK + 3] = torch.tensor([0xFFC00000 - 2 ** 32], dtype=torch.int32).view(torch.float32)[0]
    x[5] = float("inf")
    assert torch.isnan(x[BLOCK + 3])
    check(x)
    assert State().advance(x) == BLOCK + 3


def test_repeated_calls_reuse_workspace():
    """Like graph replays: one workspace, many launches; each is right, pos/seq_len step by 1 each."""
    g = torch.Generator().manual_seed(6)
    s = State(pos=100)
    results = []
    for i, v in enumerate([BLOCK + 1, 7, 128256, 3 * BLOCK + 5, 7, 1]):
        x = torch.randn(v, generator=g)
        if i == 3:
            x[BLOCK] = float("nan")
        results.append(s.advance(x))
        assert results[-1] == int(torch.argmax(x))
    assert int(s.pos) == 106 and int(s.seq_len) == 107


def test_same_logits_twice_same_token():
    """A stale key from the first call would otherwise be at least as large: the reset matters."""
    s = State()
    x = torch.zeros(2 * BLOCK)
    x[BLOCK + 1] = 5.0
    assert s.advance(x) == BLOCK + 1
    x[BLOCK + 1] = 0.0
    x[BLOCK + 2] = 1.0  # a smaller maximum than before
    assert s.advance(x) == BLOCK + 2


@pytest.mark.parametrize("case, fragment", [
    ("fp16-logits", "logits must be contiguous fp32"),
    ("two-rows", "(2, 50)"),
    ("strided", "contiguous=False"),
    ("empty", "V >= 1"),
    ("int32-token", "token must be torch.int64 [1]"),
    ("int64-pos", "pos must be torch.int32 [1]"),
    ("seq-len-shape", "seq_len must be torch.int32 [1], got torch.int32 (2,)"),
    ("bad-block", "block=100"),
])
def test_rejects_bad_arguments(case, fragment):
    s = State()
    logits, token, pos, seq_len, block = torch.randn(50), s.token, s.pos, s.seq_len, BLOCK
    if case == "fp16-logits":
        logits = logits.half()
    elif case == "two-rows":
        logits = torch.randn(2, 50)
    elif case == "strided":
        logits = torch.randn(100)[::2]
    elif case == "empty":
        logits = torch.randn(0)
    elif case == "int32-token":
        token = torch.zeros(1, dtype=torch.int32)
    elif case == "int64-pos":
        pos = torch.zeros(1, dtype=torch.int64)
    elif case == "seq-len-shape":
        seq_len = torch.zeros(2, dtype=torch.int32)
    elif case == "bad-block":
        block = 100
    with pytest.raises(ValueError, match="greedy_advance") as err:
        greedy_advance(logits, token, pos, seq_len, s.ws, block=block)
    assert fragment in str(err.value)


def _key(value: float, index: int) -> int:
    """The key layout of kernels/argmax.py, in Python (finite value)."""
    bits = int(torch.tensor([value], dtype=torch.float32).view(torch.int32))
    hi = bits ^ 0x7FFFFFFF if bits < 0 else bits
    return (hi << 32) | (0xFFFFFFFF - index)


def test_merge_order_does_not_matter():
    """On a GPU the programs merge in any order; the interpreter runs them in order 0, 1, ... Seeding the
    workspace stands in for a program that merged before the others."""
    x = torch.zeros(3 * BLOCK)
    x[[5, 2 * BLOCK + 1]] = 3.0
    s = State()
    s.ws.best_key.fill_(_key(3.0, 2 * BLOCK + 1))  # the later block merged first: the earlier index still wins
    assert s.advance(x) == 5
    s.ws.best_key.fill_(_key(3.0, 2))  # an equal value at a smaller index merged first: it wins
    assert s.advance(x) == 2
    s.ws.best_key.fill_(_key(-1.0, 0))  # a smaller value merged first: it loses
    assert s.advance(x) == 5
