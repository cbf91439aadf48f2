"""Per-card tuned tables (kernels/tuned/<card>.json): names, lookup, fallback and contents."""

import json
import warnings

import pytest
import torch

from qruntime.kernels import tuning
from qruntime.kernels.layout import prepare
from qruntime.kernels.tma_frag_gemm import TMA_PATHS, WARP_SPECIALIZED, loader_register_cap, tma_grid
from qruntime.quantizers.rtn import quantize_rtn
from packed_linears import make_linear


@pytest.mark.parametrize("name, slug", [("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"), ("NVIDIA H200", "nvidia-h200"),
                                        ("NVIDIA GeForce RTX 4090", "nvidia-geforce-rtx-4090")])
def test_card_slug(name, slug):
    assert tuning.card_slug(name) == slug


def test_every_table_is_well_formed():
    tables = sorted(tuning.TABLES.glob("*.json"))
    assert {p.stem for p in tables} >= {tuning.FALLBACK_CARD, "nvidia-h200"}
    for path in tables:
        table = json.loads(path.read_text())
        assert table, path
        for key, cfg in table.items():
            kind, weights, m, n, k = key.split("/")
            assert kind in ("splitk", "step", "gemm") and m[0] == "m" and n[0] == "n" and k[0] == "k", (path, key)
            bits, group, zero_mode = tuning.parse_weights_key(weights)
            if group:  # groups under 128 (tuning.weights_key): decode GEMVs of one row only
                assert kind in ("splitk", "step") and m == "m1" and group < 128, (path, key)
            assert tuning.weights_key(bits, group or 128, zero_mode) == weights, (path, key)
            assert len(cfg) == 5 and all(isinstance(v, int) and v > 0 for v in cfg[:4]), (path, key)
            if kind in ("splitk", "step"):
                assert cfg[4] in (False, True, "packed", "slots", "slots-unrolled", "frags") + TMA_PATHS, (path, key)
            if cfg[4] == "frags":  # kernels.frag_gemm: one or two 32-column tiles a warp, K slices of whole
                # blocks (g128: 128 columns of K), walked 1 or 2 blocks at a time
                assert cfg[0] in (32 * cfg[3], 64 * cfg[3]) and cfg[1] % 128 == 0 and m != "m1", (path, key)
                assert cfg[2] in (1, 2) and (cfg[1] // 128) % cfg[2] == 0, (path, key)
            grid = tma_grid(cfg[4])  # the TMA kernel's grid, whichever way its scales go
            if grid == "tma-frags":  # kernels.tma_frag_gemm: the same tiles, K slices of whole blocks of 128,
                # rings of 1-3 stages
                assert cfg[0] in (32 * cfg[3], 64 * cfg[3]) and cfg[1] % 128 == 0 and m != "m1", (path, key)
                assert 1 <= cfg[2] <= 3, (path, key)
            if grid == "tma-stream":  # the same tiles and rings, 1-32 programs an SM
                assert cfg[0] in (32 * cfg[3], 64 * cfg[3]) and 1 <= cfg[1] <= 32 and m != "m1", (path, key)
                assert 1 <= cfg[2] <= 3, (path, key)
            if grid and cfg[4].startswith(WARP_SPECIALIZED):  # groups of 4 warps, a register cap that fits
                tiles = cfg[0] // (32 * cfg[3])
                assert loader_register_cap(cfg[3], tiles, cfg[1] if grid == "tma-stream" else None), (path, key)


def test_each_card_reads_its_own_table(monkeypatch):
    """The H200's and the H100's tables differ on measured shapes; a config comes from the card's own."""
    h100 = json.loads((tuning.TABLES / "nvidia-h100-80gb-hbm3.json").read_text())
    h200 = json.loads((tuning.TABLES / "nvidia-h200.json").read_text())
    key = next(k for k in h200 if k.startswith("splitk/w8/m1/") and h200[k] != h100.get(k))
    _, bits, _, n, k = key.split("/")
    args = (int(bits[1:]), int(n[1:]), int(k[1:]), 1)
    monkeypatch.setattr(tuning, "_card", lambda index: "nvidia-h200")
    assert list(tuning.splitk_config(*args, device=torch.device("cuda", 0))) == h200[key]
    monkeypatch.setattr(tuning, "_card", lambda index: "nvidia-h100-80gb-hbm3")
    assert list(tuning.splitk_config(*args, device=torch.device("cuda", 0))) == h100[key]
    assert list(tuning.splitk_config(*args)) == h100[key]  # no CUDA device: the fallback table


def test_unknown_card_warns_and_uses_the_fallback(monkeypatch):
    monkeypatch.setattr(tuning, "_card", lambda index: "acme-gpu-9000")
    tuning._table.cache_clear()
    try:
        with pytest.warns(UserWarning, match="acme-gpu-9000.*bench_gemv"):
            cfg = tuning.splitk_config(4, 4096, 4096, 1, device=torch.device("cuda", 0))
        assert cfg == tuple(tuning._table(tuning.FALLBACK_CARD)["splitk/w4/m1/n4096/k4096"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per card, not per linear
            tuning.splitk_config(4, 4096, 4096, 1, device=torch.device("cuda", 0))
    finally:
        tuning._table.cache_clear()


def test_decode_step_linears_take_the_step_entries(monkeypatch):
    """A linear of the decode step takes the table's "step/" entry when there is one, else the
    standalone "splitk/" entry, which every other caller takes."""
    table = {"splitk/w4/m1/n64/k128": [32, 128, 2, 1, "packed"], "step/w4/m1/n64/k128": [64, 128, 1, 1, "packed"],
             "splitk/w4/m1/n32/k128": [16, 64, 1, 1, "packed"]}
    monkeypatch.setattr(tuning, "_table_for", lambda device: table)
    alone = prepare(quantize_rtn(torch.randn(64, 128), 4, 32, False), torch.device("cpu"), torch.float16)
    in_step = prepare(quantize_rtn(torch.randn(64, 128), 4, 32, False), torch.device("cpu"), torch.float16)
    in_step.in_decode_step = True
    assert list(alone.splitk_config(1)) == table["splitk/w4/m1/n64/k128"]
    assert list(in_step.splitk_config(1)) == table["step/w4/m1/n64/k128"]
    narrow = prepare(quantize_rtn(torch.randn(32, 128), 4, 32, False), torch.device("cpu"), torch.float16)
    narrow.in_decode_step = True
    assert list(narrow.splitk_config(1)) == table["splitk/w4/m1/n32/k128"]


@pytest.mark.parametrize("bits, group, zero_mode, k, key", [
    (4, 128, "int", None, "w4"), (8, -1, "symmetric", None, "w8"), (4, 256, "float", None, "w4"),
    (4, 64, "int", 64, "w4"),  # one group per row
    (8, 32, "symmetric", None, "w8g32s"), (4, 32, "float", 4096, "w4g32f"), (4, 32, "int", None, "w4g32"),
    (8, 16, "symmetric", 4096, "w8g16s")])
def test_weights_key(bits, group, zero_mode, k, key):
    assert tuning.weights_key(bits, group, zero_mode, k) == key
    if "g" in key:
        assert tuning.parse_weights_key(key) == (bits, group, zero_mode)


def _linear(n: int, k: int, bits: int, group: int, zero_mode: str):
    return prepare(make_linear(n, k, bits, group, zero_mode), torch.device("cpu"), torch.float16)


def test_small_groups_take_their_own_entries(monkeypatch):
    """At M = 1 a linear of groups under 128 takes its own weights' entry (before the default's
    step entry), else the same group's with another zero mode, else the default's; at M = 16 the
    default's."""
    table = {"splitk/w8/m1/n64/k256": [64, 128, 2, 2, "packed"], "step/w8/m1/n64/k256": [128, 128, 1, 1, "packed"],
             "splitk/w8g32s/m1/n64/k256": [32, 128, 2, 1, "packed"], "splitk/w8/m16/n64/k256": [64, 256, 1, 2, "frags"],
             "splitk/w4g32s/m1/n64/k256": [64, 64, 1, 1, "packed"], "splitk/w4/m1/n64/k256": [32, 256, 1, 1, "packed"]}
    monkeypatch.setattr(tuning, "_table_for", lambda device: table)
    q8_0 = _linear(64, 256, 8, 32, "symmetric")
    q8_0.in_decode_step = True
    assert q8_0.splitk_config(1) == tuple(table["splitk/w8g32s/m1/n64/k256"])
    assert q8_0.splitk_config(16) == tuple(table["splitk/w8/m16/n64/k256"])
    assert _linear(64, 256, 8, 128, "int").splitk_config(1) == tuple(table["splitk/w8/m1/n64/k256"])
    assert _linear(64, 256, 8, 16, "symmetric").splitk_config(1) == tuple(table["splitk/w8/m1/n64/k256"])
    assert _linear(64, 256, 4, 32, "float").splitk_config(1) == tuple(table["splitk/w4g32s/m1/n64/k256"])
    assert _linear(64, 256, 4, 16, "float").splitk_config(1) == tuple(table["splitk/w4/m1/n64/k256"])


def test_small_groups_step_entry_comes_first_in_the_step(monkeypatch):
    """A "step/<own weights>" entry (e2e_tune.py --weights) is the decode step's choice for those
    weights, ahead of their standalone entry and of the default's step entry; outside the step the
    standalone entry stands."""
    table = {"step/w8/m1/n64/k256": [128, 128, 1, 1, "packed"], "splitk/w8g32s/m1/n64/k256": [32, 128, 2, 1, "packed"],
             "step/w8g32s/m1/n64/k256": [64, 64, 1, 1, "packed"]}
    monkeypatch.setattr(tuning, "_table_for", lambda device: table)
    q8_0 = _linear(64, 256, 8, 32, "symmetric")
    assert q8_0.splitk_config(1) == tuple(table["splitk/w8g32s/m1/n64/k256"])
    q8_0.in_decode_step = True
    assert q8_0.splitk_config(1) == tuple(table["step/w8g32s/m1/n64/k256"])


def test_linear_asks_for_its_own_device():
    lin = prepare(quantize_rtn(torch.randn(64, 128), 4, 32, False), torch.device("cpu"), torch.float32)
    assert lin.splitk_config(1) == tuning.splitk_config(4, 64, 128, 1, group_size=32, zero_mode="int")
    assert lin.gemm_config(128) == tuning.gemm_config(4, 64, 128, 128)


def test_tables_ship_with_the_package():
    import tomllib
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "tuned/*.json" in meta["tool"]["setuptools"]["package-data"]["qruntime.kernels"]


def test_nearest_entry_takes_the_closest_shape_in_log_scale():
    """Distance is |log2 N/N'| + |log2 K/K'|; of equally near shapes the smaller wins; only keys of the
    prefix count, and keys added later are seen."""
    table = {"step/w4/m1/n2048/k2048": [64, 64, 1, 1, "packed"], "step/w4/m1/n4096/k4096": [128, 128, 1, 1, "packed"],
             "splitk/w4/m1/n3072/k3072": [32, 256, 1, 1, "packed"], "step/w8/m1/n3072/k3072": [16, 64, 1, 1, "packed"]}
    assert tuning.nearest_entry(table, "step/w4/m1", 1536, 1536) == table["step/w4/m1/n2048/k2048"]
    assert tuning.nearest_entry(table, "step/w4/m1", 3584, 3584) == table["step/w4/m1/n4096/k4096"]
    # 2048 x 4096 is one octave from both: the smaller shape
    assert tuning.nearest_entry(table, "step/w4/m1", 2048, 4096) == table["step/w4/m1/n2048/k2048"]
    assert tuning.nearest_entry(table, "step/w4/m16", 2048, 2048) is None
    table["step/w4/m1/n1024/k1024"] = [32, 32, 1, 1, "packed"]
    assert tuning.nearest_entry(table, "step/w4/m1", 1024, 1536) == table["step/w4/m1/n1024/k1024"]
    # a key removed and another added (as e2e_tune.py does, the table's size unchanged): both seen
    del table["step/w4/m1/n1024/k1024"]
    table["step/w4/m1/n1024/k2048"] = [16, 32, 1, 1, "packed"]
    assert tuning.nearest_entry(table, "step/w4/m1", 1024, 1536) == table["step/w4/m1/n1024/k2048"]
    assert tuning.nearest_entry(table, "step/w4/m1", 1024, 1024) == table["step/w4/m1/n1024/k2048"]


def test_unmeasured_shapes(monkeypatch):
    """A shape missing from the table: at M = 1 the default tile where it gives every SM a program,
    else the nearest measured shape's entry (the step's in the decode step, then the standalone
    one); at M = 16 the nearest M = 16 entry; with no entry at all the fixed defaults."""
    table = {"step/w4/m1/n2048/k2048": [64, 64, 1, 1, "packed"], "splitk/w4/m1/n2048/k2048": [64, 64, 1, 2, "packed"],
             "splitk/w4/m1/n14336/k4096": [128, 128, 1, 2, "packed"],
             "splitk/w4/m16/n4096/k4096": [64, 4, 3, 2, "tma-stream+scales"]}
    monkeypatch.setattr(tuning, "_table_for", lambda device: table)
    monkeypatch.setattr(tuning, "_sm_count", lambda device: 132)
    assert tuning.programs(tuning.DEFAULT_TILE, 1536, 1536) == 6 * 12
    assert tuning.splitk_config(4, 1536, 1536, 1, in_decode_step=True) == tuple(table["step/w4/m1/n2048/k2048"])
    assert tuning.splitk_config(4, 1536, 1536, 1) == tuple(table["splitk/w4/m1/n2048/k2048"])
    # 12288 x 4096: 48 x 32 programs with the default tile, which it keeps (not the nearest entry)
    assert tuning.splitk_config(4, 12288, 4096, 1, in_decode_step=True) == tuning.DEFAULT_TILE
    assert tuning.splitk_config(4, 3072, 3072, 16) == tuple(table["splitk/w4/m16/n4096/k4096"])
    # weights without entries of their own: the nearest of the default weights' (w4) at M = 1
    assert tuning.splitk_config(4, 1536, 1536, 1, group_size=32, zero_mode="float") == tuple(table["splitk/w4/m1/n2048/k2048"])
    assert tuning.splitk_config(8, 1536, 1536, 1) == tuning.DEFAULT_TILE  # no w8 entry at all
    assert tuning.splitk_config(8, 1536, 1536, 16) == (64, 1024, 1, 2, "frags")
    monkeypatch.setattr(tuning, "_sm_count", lambda device: 8)  # a small card: 72 programs fill it
    assert tuning.splitk_config(4, 1536, 1536, 1, in_decode_step=True) == tuning.DEFAULT_TILE


def test_unmeasured_shapes_off_the_gpu_keep_the_fixed_tiles(monkeypatch):
    """Without a CUDA device (the interpreter runs programs one after another) there are no idle SMs
    to fill: a shape missing from the table keeps the fixed tiles."""
    table = {"step/w4/m1/n2048/k2048": [64, 64, 1, 1, "packed"], "splitk/w4/m16/n4096/k4096": [64, 4, 3, 2, "tma-stream"]}
    monkeypatch.setattr(tuning, "_table_for", lambda device: table)
    assert tuning._sm_count(torch.device("cpu")) is None and tuning._sm_count(None) is None
    assert tuning.splitk_config(4, 1536, 1536, 1, torch.device("cpu"), in_decode_step=True) == tuning.DEFAULT_TILE
    assert tuning.splitk_config(4, 1536, 1536, 16, torch.device("cpu")) == (64, 1024, 1, 2, "frags")
