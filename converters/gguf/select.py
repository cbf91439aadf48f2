"""Which GGUF file to read: a file as given, the one file of a quant type in a directory, or the
one file of that type in a Hugging Face repository (downloaded alone).

Quant types are llama.cpp's file type names (`llama-quantize --help`): Q4_K_M, Q8_0, IQ2_XS...
They are matched in file names case-insensitively, between separators, the way the hub names
files (`Llama-3.2-1B-Instruct-Q4_K_M.gguf`, `qwen2.5-0.5b-instruct-q4_k_m.gguf`).
"""

from __future__ import annotations

import re
from pathlib import Path

from qruntime.errors import InvalidOptionError, ModelNotFoundError, NotAModelError

# llama.cpp file types (llama_ftype names, src/llama-quant.cpp / tools/quantize)
FILE_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M",
    "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS",
    "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4_MOE",
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def file_type(file_name: str) -> str | None:
    """The llama.cpp file type a file name states, the longest that fits ("x-Q2_K_S.gguf" is
    Q2_K_S, not Q2_K), or None."""
    stem = file_name[: -len(".gguf")] if file_name.lower().endswith(".gguf") else file_name
    for t in sorted(FILE_TYPES, key=len, reverse=True):
        if re.search(rf"(^|[-._ ]){re.escape(t)}($|[-._ ])", stem, flags=re.IGNORECASE):
            return t
    return None


def _matches(file_name: str, quant: str) -> bool:
    return file_type(file_name) == quant.upper()


def _check_quant(quant: str) -> str:
    if quant.upper() not in FILE_TYPES:
        raise InvalidOptionError(f"{quant!r} is not a llama.cpp quant type; known: {', '.join(FILE_TYPES)}")
    return quant


def pick(names: list[str], quant: str | None, where: str) -> str:
    """The one name in `names` (GGUF file names) of type `quant`; a clear error listing them otherwise."""
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
    if quant is None:
        if len(ggufs) == 1:
            return ggufs[0]
        chosen: list[str] = []
    else:
        chosen = [n for n in ggufs if _matches(n, _check_quant(quant))]
        if len(chosen) == 1:
            return chosen[0]
    listing = ", ".join(ggufs) or "no .gguf files"
    if quant is None:
        raise InvalidOptionError(f"{where}: holds {len(ggufs)} GGUF files ({listing}); choose one with "
                                 "`--from gguf QUANT` (e.g. q4_k_m) or pass the file itself")
    if not chosen:
        raise NotAModelError(f"{where}: no GGUF file of type {quant.upper()} (found: {listing})")
    raise InvalidOptionError(f"{where}: several GGUF files match {quant.upper()} ({', '.join(chosen)}); "
                             "pass the file itself (split files are not supported)")


def local_file(path: Path, quant: str | None) -> Path:
    """A GGUF path: the file itself, or the file of type `quant` in a directory."""
    if path.is_file():
        if quant is not None and not _matches(path.name, _check_quant(quant)):
            raise InvalidOptionError(f"{path}: the file name does not say {quant.upper()}; pass the file "
                                     "without a quant type, or the directory")
        return path
    if path.is_dir():
        return path / pick([p.name for p in path.iterdir() if p.is_file()], quant, str(path))
    raise ModelNotFoundError(f"{path}: no such file or directory")


def looks_like_repo_id(text: str) -> bool:
    return _REPO_ID.match(text) is not None and not Path(text).exists()


def hub_file(repo_id: str, quant: str | None) -> Path:
    """Downloads the one GGUF file of type `quant` from a Hugging Face repository (not tested
    offline: needs huggingface_hub and network access)."""
    try:
        from huggingface_hub import hf_hub_download, list_repo_files
    except ImportError:
        raise ModelNotFoundError(f"{repo_id}: not a local path, and huggingface_hub is not installed to fetch it "
                                 "from the hub (pip install huggingface_hub)") from None
    try:
        name = pick(list_repo_files(repo_id), quant, f"hub repo {repo_id}")
        return Path(hf_hub_download(repo_id, name))
    except (InvalidOptionError, NotAModelError):
        raise
    except Exception as e:  # offline, unknown repo, gated repo: all say why in their message
        raise ModelNotFoundError(f"{repo_id}: not a local path and the hub cannot provide it "
                                 f"({type(e).__name__}: {e}); download the .gguf file and pass its path") from None
