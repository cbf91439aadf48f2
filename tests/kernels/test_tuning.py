"""Per-card tuned tables (kernels/tuned/<card>.json): names, lookup, fallback and contents."""

import json
import warnings

import pytest
import torch

from qruntime.kernels import tuning
from qruntime.kernels.layout import prepare
from qruntime.kernels.tma_frag_gemm import TMA_PATHS, WARP_SPECIALIZED, loader_register_cap, tma_grid
from qruntime.quantizers.rtn import quantize_rtn


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
            kind, bits, m, n, k = key.split("/")
            assert kind in ("splitk", "step", "gemm") and bits in ("w4", "w8") and m[0] == "m" and n[0] == "n" and k[0] == "k"
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


def test_linear_asks_for_its_own_device():
    lin = prepare(quantize_rtn(torch.randn(64, 128), 4, 32, False), torch.device("cpu"), torch.float32)
    assert lin.splitk_config(1) == tuning.splitk_config(4, 64, 128, 1)
    assert lin.gemm_config(128) == tuning.gemm_config(4, 64, 128, 128)


def test_tables_ship_with_the_package():
    import tomllib
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "tuned/*.json" in meta["tool"]["setuptools"]["package-data"]["qruntime.kernels"]
