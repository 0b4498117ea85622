"""How feature rows are stored (``extract --store-dtype``), and turned back into float maps on read.

    float16, float32   the maps as they are (fill value NaN)
    bfloat16           the top 16 bits of each float32, rounded to nearest even, in a uint16
                       array (zarr and HDF5 have no bfloat16); fill 0x7FC0, bfloat16's NaN
    int8               q in [-127, 127] with one (offset, scale) pair per video and channel,
                       x ~ offset + scale * (q + 127), in the companion array ``<name>_quant``
                       (N, [V,] C, 2) float32; fill -128, a value no stored row holds

The cache API (``FeatureCache``) dequantises every row it reads, so every reader gets float rows
of the cache's ``dtype`` (the maps' dtype, float16 by default) and never sees the stored form; the
stored form is the attribute ``store_dtype``, shown by ``info``.

int8 comes in two flavours, measured by ``bench/cache_io.py`` on float16 ReLU maps: symmetric
(offset = -127 * scale, scale = max |x| / 127: zero is exact, half the codes unused on ReLU maps)
and affine (offset = min x, scale = (max x - min x) / 254: all 255 codes span the channel's range).
Affine is the default (``INT8_MODE``): on non-negative maps it halves the step, and so the error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cache.errors import UserError

STORE_DTYPES = ("float16", "float32", "bfloat16", "int8")
INT8_MODES = ("affine", "symmetric")
INT8_MODE = "affine"
QUANT_SUFFIX = "_quant"  # companion array of an int8 row array: (offset, scale) per channel
BFLOAT16_NAN = 0x7FC0
INT8_FILL = -128
CHANNEL_AXIS = -4  # rows are (..., C, T, H, W)


@dataclass(frozen=True)
class StoreFormat:
    """One stored form of the rows: what the row arrays hold and how they read back."""

    name: str  # the --store-dtype
    array_dtype: str  # dtype of the stored row arrays
    fill_value: float | int  # what a row whose chunk is missing reads as

    @property
    def quantized(self) -> bool:
        """Whether rows need their ``<name>_quant`` companion to be read."""
        return self.name == "int8"

    @property
    def converted(self) -> bool:
        """Whether the stored values are not the maps themselves."""
        return self.name in ("bfloat16", "int8")


FORMATS = {
    "float16": StoreFormat("float16", "float16", np.nan),
    "float32": StoreFormat("float32", "float32", np.nan),
    "bfloat16": StoreFormat("bfloat16", "uint16", BFLOAT16_NAN),
    "int8": StoreFormat("int8", "int8", INT8_FILL),
}


def store_format(store_dtype: str | None, dtype: str) -> StoreFormat:
    """The format for ``--store-dtype`` (None: the maps' own ``dtype``); one-line error if
    unknown."""
    name = store_dtype or dtype
    if name not in FORMATS:
        raise UserError(f"unknown --store-dtype {name!r}; choose one of {', '.join(STORE_DTYPES)}")
    return FORMATS[name]


def stored_format(attrs: dict, array_dtype: str) -> StoreFormat:
    """The format of an existing cache: its ``store_dtype`` attribute, or (caches made before
    the attribute existed, or by other programs) the row array's own float dtype."""
    name = attrs.get("store_dtype")
    if name in FORMATS and FORMATS[name].converted:
        return FORMATS[name]
    return StoreFormat(array_dtype, array_dtype, np.nan)


# ------------------------------------------------------------------------------ bfloat16
def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float maps -> uint16 bfloat16 bit patterns (round to nearest even, as torch does)."""
    bits = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
    return bits.view(torch.int16).numpy().view(np.uint16)


def from_bfloat16_bits(bits: np.ndarray, dtype: str) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float maps of ``dtype`` (exact in float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(dtype, copy=False)


# ------------------------------------------------------------------------------ int8
def quantize_int8(x: np.ndarray, mode: str = INT8_MODE) -> tuple[np.ndarray, np.ndarray]:
    """Maps (..., C, T, H, W) -> int8 codes of the same shape and (..., C, 2) float32
    (offset, scale) per channel, such that x ~ offset + scale * (q + 127)."""
    x = np.asarray(x, dtype=np.float32)
    flat = x.reshape(*x.shape[:CHANNEL_AXIS + len(x.shape) + 1], -1)  # (..., C, THW)
    if mode == "affine":
        low, high = flat.min(axis=-1), flat.max(axis=-1)  # (..., C)
        scale = (high - low) / 254
        offset = low
    elif mode == "symmetric":
        scale = np.abs(flat).max(axis=-1) / 127  # (..., C)
        offset = -127 * scale
    else:
        raise ValueError(f"int8 mode must be one of {INT8_MODES}")
    safe = np.where(scale > 0, scale, 1).astype(np.float32)  # a constant channel: any step
    codes = np.rint((flat - offset[..., None]) / safe[..., None]) - 127
    codes = np.clip(codes, -127, 127).astype(np.int8).reshape(x.shape)
    return codes, np.stack([offset, safe], axis=-1).astype(np.float32)  # (..., C, 2)


def dequantize_int8(codes: np.ndarray, params: np.ndarray, dtype: str) -> np.ndarray:
    """int8 codes (..., C, T, H, W) and their (..., C, 2) (offset, scale) -> float maps."""
    offset = params[..., 0][..., None, None, None]  # (..., C, 1, 1, 1)
    scale = params[..., 1][..., None, None, None]
    return (offset + scale * (codes.astype(np.float32) + 127)).astype(dtype, copy=False)


# ------------------------------------------------------------------------------ rows
def encode(x: np.ndarray, fmt: StoreFormat) -> tuple[np.ndarray, np.ndarray | None]:
    """Float maps -> what the row array stores, and the int8 (offset, scale) (else None)."""
    if fmt.name == "int8":
        return quantize_int8(x)
    if fmt.name == "bfloat16":
        return to_bfloat16_bits(x), None
    return np.asarray(x).astype(fmt.array_dtype, copy=False), None


def decode(stored: np.ndarray, params: np.ndarray | None, fmt: StoreFormat,
           dtype: str) -> np.ndarray:
    """What a row array stores -> float maps of ``dtype``."""
    if fmt.name == "int8":
        return dequantize_int8(stored, params, dtype)
    if fmt.name == "bfloat16":
        return from_bfloat16_bits(stored, dtype)
    return stored.astype(dtype, copy=False)
