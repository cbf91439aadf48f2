"""Calibration text for GPTQ and AWQ: which text, how many samples, how long.

The default is `calib_default.txt`, shipped in the package (plain prose, code, numbers and
lists written for qruntime) so that quantizing works offline. Samples are windows of
`seqlen` tokens at random offsets (seeded) of the tokenized text; a text shorter than that many
samples yields overlapping windows, which is fine for statistics of the activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qruntime.errors import InvalidOptionError, ModelNotFoundError

DEFAULT_TEXT = Path(__file__).with_name("calib_default.txt")


@dataclass(frozen=True)
class Calibration:
    path: str | None = None  # None: the built-in text
    samples: int = 128
    seqlen: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seqlen < 2:
            raise InvalidOptionError(f"calibration samples={self.samples}, seqlen={self.seqlen}: need >= 1 and >= 2")

    def text(self) -> str:
        path = Path(self.path) if self.path else DEFAULT_TEXT
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: calibration text file not found (--calib)")
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise InvalidOptionError(f"{path}: calibration text is empty")
        return text


def calibration_ids(tokenizer, calib: Calibration) -> torch.Tensor:
    """[samples, seqlen] token ids drawn from the calibration text."""
    if tokenizer is None:
        raise InvalidOptionError("GPTQ/AWQ calibration needs the model's tokenizer files beside its weights")
    ids = torch.tensor(tokenizer.encode(calib.text(), add_special_tokens=False), dtype=torch.long)
    if ids.numel() < calib.seqlen:
        raise InvalidOptionError(
            f"the calibration text has {ids.numel()} tokens, fewer than --calib-seqlen {calib.seqlen}; "
            "give a longer --calib file or a smaller --calib-seqlen"
        )
    gen = torch.Generator().manual_seed(calib.seed)
    starts = torch.randint(0, ids.numel() - calib.seqlen + 1, (calib.samples,), generator=gen)
    return torch.stack([ids[s: s + calib.seqlen] for s in starts.tolist()])
