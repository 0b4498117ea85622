"""Row codecs: how a cache's feature rows are compressed on disk (``extract --codec``), by name.

Every Zarr row codec is followed by a CRC32C of the compressed bytes (the row checksum). The
codec is part of each row array's own Zarr metadata, so any reader (zarr, this tool, another
program) decodes it with no option; the name is also stored in the attribute ``codec`` and shown
by ``info``. HDF5 caches keep gzip level 1 with byte shuffle and Fletcher-32 (``gzip``).

How the default was chosen (``bench/cache_io.py``, float16 ReLU maps of ResNet-50's shape, one
core): Zstandard level 1 on its own compresses as well as Blosc-zstd with byte shuffle (1.8x)
and encodes faster; LZ4 variants are faster still but store 1.3x (lz4) or 1.1x (blosc-lz4)
instead of 1.8x, and ``none`` only checksums. See README "Cache format" for the figures.
"""

from __future__ import annotations

from zarr.codecs import LZ4, BloscCodec, Crc32cCodec, ZstdCodec

from cache.errors import UserError

DEFAULT_CODEC = "zstd"
HDF5_CODEC = "gzip"
# name -> (what it is, a factory of the Zarr compressors before the checksum)
ZARR_CODECS = {
    "zstd": ("Zstandard level 1", lambda: (ZstdCodec(level=1),)),
    "blosc-zstd": ("Blosc Zstandard level 1, byte shuffle (the default before issue 26)",
                   lambda: (BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),)),
    "lz4": ("LZ4", lambda: (LZ4(),)),
    "blosc-lz4": ("Blosc LZ4 level 5, byte shuffle",
                  lambda: (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)),
    "none": ("no compression (checksum only)", lambda: ()),
}
CODECS = (*ZARR_CODECS, HDF5_CODEC)


def check_codec(codec: str | None, backend: str) -> str:
    """The codec a new cache of ``backend`` gets for ``codec`` (None: the backend's default);
    a one-line UserError for a name the backend does not take."""
    if backend == "hdf5":
        if codec not in (None, HDF5_CODEC):
            raise UserError(f"--codec {codec} is for the zarr backend; an hdf5 cache is "
                            f"compressed with {HDF5_CODEC} (omit --codec, or use --backend zarr)")
        return HDF5_CODEC
    codec = codec or DEFAULT_CODEC
    if codec not in ZARR_CODECS:
        raise UserError(f"unknown --codec {codec!r}; choose one of {', '.join(ZARR_CODECS)}")
    return codec


def zarr_row_compressors(codec: str, checksum: bool = True) -> tuple:
    """The Zarr compressors of a row array: the codec's, then the CRC32C checksum."""
    return (*ZARR_CODECS[codec][1](), *((Crc32cCodec(),) if checksum else ()))
