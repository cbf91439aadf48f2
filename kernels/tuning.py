"""Block sizes per shape, chosen from tables measured on each GPU (benchmarks/bench_gemv.py).

No autotuning at run time: the first token must not wait minutes. One table per card model lives in
kernels/tuned/<card>.json (the card's name as torch reports it, lower-cased, non-alphanumerics as
'-'), because the best tiles differ between cards (the H200's higher bandwidth favours other
tiles than the H100's). A card without a table uses the H100's, with a warning that says how to
make one; a shape missing from a table gets DEFAULT_TILE, or where that would leave SMs idle, the
entry of the nearest shape the table has (nearest_entry).

Two kinds of decode entries: "splitk/..." (a GEMV on its own, measured in a chain of its own
launches by bench_gemv.py) and "step/..." (inside the decode step, chosen by end-to-end ms/token
with e2e_tune.py), since the best tiles differ: in the step smaller column tiles over two K-slice
tiles win, alone they lose (benchmarks/results/h200/e2e_tune.log, ab_gemv_early.log). The decode
step's linears ask for the step entry first (TritonLinear.in_decode_step). Keys name the weights
as "w4" / "w8" (groups of 128 or more); weights of smaller groups, as GGUF files convert to, have
M = 1 entries of their own where measured ("w8g32s/...", weights_key).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from functools import lru_cache
from pathlib import Path

import torch

TABLES = Path(__file__).with_name("tuned")
FALLBACK_CARD = "nvidia-h100-80gb-hbm3"


def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': a table's file name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@lru_cache(maxsize=None)
def _card(device_index: int) -> str:
    return card_slug(torch.cuda.get_device_name(device_index))


@lru_cache(maxsize=None)
def _table(card: str | None) -> dict:
    """The table for `card` (None: no CUDA card, e.g. the CPU interpreter: the fallback table)."""
    path = TABLES / f"{card or FALLBACK_CARD}.json"
    if not path.is_file():
        warnings.warn(f"no tuned kernel table for this GPU ({card}): using {FALLBACK_CARD}'s; make one with "
                      f"benchmarks/bench_gemv.py and benchmarks/merge_tuned.py kernels/tuned/{card}.json", stacklevel=3)
        path = TABLES / f"{FALLBACK_CARD}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _table_for(device: torch.device | None) -> dict:
    if device is None or device.type != "cuda":
        return _table(None)
    return _table(_card(device.index if device.index is not None else torch.cuda.current_device()))


def gemm_config(bits: int, n: int, k: int, m: int, device: torch.device | None = None) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the whole-K (prefill) kernel."""
    hit = _table_for(device).get(f"gemm/w{bits}/m{min(m, 128)}/n{n}/k{k}")
    if hit:
        return tuple(hit)
    if m <= 16:
        return 16, 64, 128, 4, 3
    if m <= 64:
        return 64, 64, 64, 4, 3
    return 128, 128, 64, 8, 3


# the few-row decode kernels' fallback when a "frags" config's kernel cannot serve a linear (float
# offsets, act-order, groups smaller than its chunk): the slot kernel's former default
FEW_ROWS_FALLBACK = (128, 128, 4, 4, "slots")


_ZERO_TAGS = {"int": "", "symmetric": "s", "float": "f"}


def weights_key(bits: int, group_size: int, zero_mode: str = "int", k: int | None = None) -> str:
    """The tables' name for a linear's weights: "w4" / "w8" for groups of 128 or more, or one group
    per row (group_size -1 or >= k), the tables' default: a K tile of up to 128 then lies inside
    one group. Smaller groups add the group and the zero mode, e.g. "w8g32s" (GGUF's Q8_0),
    "w4g32f" (Q4_K), "w8g16s" (Q6_K): several groups a tile want other tiles at M = 1 (int8 g32
    symmetric ran at 56-75% of the read bandwidth on the g128 tiles of three 8B shapes and at
    88-106% on its own; benchmarks/results/h200/gemv_groups.log)."""
    if group_size <= 0 or group_size >= 128 or (k is not None and group_size >= k):
        return f"w{bits}"
    return f"w{bits}g{group_size}{_ZERO_TAGS[zero_mode]}"


def parse_weights_key(weights: str) -> tuple[int, int | None, str]:
    """weights_key's inverse, for checking tables: "w8g32s" -> (8, 32, "symmetric"); "w4" -> (4, None, "int")."""
    bits, group, tag = re.fullmatch(r"w([48])(?:g(\d+)([a-z]?))?", weights).groups()
    modes = {t: mode for mode, t in _ZERO_TAGS.items()}
    return int(bits), int(group) if group else None, modes[tag or ""]


# the packed path won every measured M = 1 shape but the smallest int8 one
# (benchmarks/results/gemv_sweep_w4.json, gemv_sweep_w8.json), mostly with this tile
DEFAULT_TILE = (256, 128, 1, 2, "packed")
# M > 1: the fragment kernel beat the slot kernel on every M = 16 shape measured (H200, gemv_sweep_m16_frags.json)
FEW_ROWS_DEFAULT_TILE = (64, 1024, 1, 2, "frags")
# Below this many programs an SM (i.e. with SMs left idle), a shape no table measured takes its
# nearest measured shape's entry instead of DEFAULT_TILE. H100, models of unmeasured shapes, ms/token
# with the nearest entry against DEFAULT_TILE, one role's GEMV at a time in one process
# (benchmarks/results/h100/ab_nearest_s39.log): Qwen2.5-1.5B w4's o (72 programs) and q|k|v (96)
# -7.4 / -2.0%; but the nearest entries of shapes with 160-480 programs ranged from -4.9 to +2.5%,
# those of larger shapes lost up to 6.8% (Llama-3.2-3B's gate|up), and the nearest entry
# everywhere cost Llama-3.2-3B, Qwen2.5-3B and Qwen3-4B w8 6-9% while gaining 12% on Qwen2.5-1.5B w4.
UNDERFILLED_PROGRAMS_PER_SM = 1


def programs(config: tuple, n: int, k: int) -> int:
    """Programs of the packed GEMV's grid for config (BLOCK_N, BLOCK_K, column tiles a program, ...)."""
    block_n, block_k, tiles = config[:3]
    return -(-n // (block_n * tiles)) * -(-k // block_k)


@lru_cache(maxsize=None)
def multiprocessors(device_index: int) -> int:
    """SMs of CUDA device `device_index` (also the TMA kernel's stream grid: kernels.tma_frag_gemm)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device | None) -> int | None:
    """The device's SMs; None without a CUDA device (Triton's interpreter runs the programs one
    after another: there more programs only cost time, 3x on the engine's tests)."""
    if device is None or device.type != "cuda":
        return None
    return multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def nearest_entry(table: dict, prefix: str, n: int, k: int) -> list | None:
    """The entry under `prefix` (e.g. "step/w4/m1") whose shape is nearest (n, k), by the sum of
    |log2| of the two ratios (ties: the smaller shape), or None when `prefix` has none: what a
    shape no table measured takes where DEFAULT_TILE would leave SMs idle (splitk_config)."""
    best = None
    for n2, k2, key in _shapes_under(tuple(table), prefix):
        dist = abs(math.log2(n / n2)) + abs(math.log2(k / k2))
        if best is None or (dist, n2 * k2) < best[:2]:
            best = (dist, n2 * k2, key)
    return None if best is None else table[best[2]]


@lru_cache(maxsize=64)
def _shapes_under(keys: tuple[str, ...], prefix: str) -> tuple[tuple[int, int, str], ...]:
    """(n, k, key) of the keys "<prefix>/n<N>/k<K>"; memoized on the keys themselves, so a table
    whose keys change (benchmark scripts add and remove entries) is parsed again."""
    found = []
    for key in keys:
        head, _, shape = key.partition(prefix + "/n")
        n_text, _, k_text = shape.partition("/k")
        if not head and n_text.isdigit() and k_text.isdigit():
            found.append((int(n_text), int(k_text), key))
    return tuple(found)


def splitk_config(bits: int, n: int, k: int, m: int = 1, device: torch.device | None = None,
                  in_decode_step: bool = False, group_size: int = 128,
                  zero_mode: str = "int") -> tuple[int, int, int, int, bool | str]:
    """(BLOCK_N, BLOCK_K, K_ITERS, num_warps, path) for the split-K decode kernels
    (kernels.qmatmul.qmatmul_accumulate); in_decode_step: the step's entry when the table has one.
    At M = 1, weights of groups smaller than 128 take their own entry (weights_key), else one of
    the same group with another zero mode, else the default's; at M = 16 every group takes the
    default's. (A fixed tile for small groups where none was measured lost to the default's on the
    1B shapes: Q8_0 0.442 -> 0.478 ms/token, llamacpp_peer_convert_1b.md.) A small-group entry, measured
    alone, also comes before the g128 step entry of its shape: keep one only where it wins end to end
    (Qwen2.5-7B Q8_0's o, gate|up and down entries took the step's tiles' place and were dropped:
    with them 1.997 -> 1.994 ms/token, without 1.997 -> 1.906; ab_converted_groups.log). The other
    order, the g128 step entry first, lost on each file tried (1B Q8_0 / Q4_K_M / Q4_0 +3.7 / +2.3 /
    +7.0%, 8B Q8_0 +23%). A "step/<own weights>" entry (e2e_tune.py --weights) comes first of all.
    The step's GEMVs take fp16 rows whatever the model's 16-bit dtype, which is why the tables have no dtype.
    A shape none of those keys has: see UNDERFILLED_PROGRAMS_PER_SM (the nearest shape's entry is
    looked for in the same order of keys, the step's before the standalone one)."""
    table = _table_for(device)
    rows = 1 if m == 1 else 16
    keys = [f"w{bits}"]
    own = weights_key(bits, group_size, zero_mode, k)
    if m == 1 and own != keys[0]:
        keys = list(dict.fromkeys([own] + [weights_key(bits, group_size, mode, k) for mode in _ZERO_TAGS] + keys))
    for weights in keys:
        shape = f"{weights}/m{rows}/n{n}/k{k}"
        hit = (in_decode_step and table.get(f"step/{shape}")) or table.get(f"splitk/{shape}")
        if hit:
            return tuple(hit)
    # a shape no table measured: M = 1 takes DEFAULT_TILE where it gives every SM a program, the
    # entry of the nearest measured shape where it would not; M > 1 the nearest entry (the TMA
    # kernels' tiles), else FEW_ROWS_DEFAULT_TILE
    fixed = DEFAULT_TILE if m == 1 else FEW_ROWS_DEFAULT_TILE
    sms = _sm_count(device)
    if sms is None or (m == 1 and programs(DEFAULT_TILE, n, k) >= UNDERFILLED_PROGRAMS_PER_SM * sms):
        return fixed
    for weights in keys:
        for kind in ("step", "splitk") if in_decode_step else ("splitk",):
            hit = nearest_entry(table, f"{kind}/{weights}/m{rows}", n, k)
            if hit:
                return tuple(hit)
    return fixed
