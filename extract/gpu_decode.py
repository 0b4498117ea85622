"""NVIDIA hardware video decoding (NVDEC) through PyNvVideoCodec, for ``--decoder gpu|auto``.

**Untested on hardware**: written against PyNvVideoCodec 2.2.4's documented API
(``SimpleDecoder(..., use_device_memory=False, output_color_type=RGB)``,
``get_batch_frames_by_index``, frames read through DLPack), with no GPU lent to run it. On this
CPU-only machine only the selection, the refusals and the fallback to the CPU decoders are
tested (with a fake GPU reader).

The GPU decodes only the picked frames to host RGB; ``extract.decode.crop_views`` then resizes
and crops them exactly as it does decord's and PyAV's frames, so the rows have the same layout,
dtype and size on both paths (the pixels may differ by the codec's rounding: NVDEC's colour
conversion is not FFmpeg's). A clip the GPU rejects goes on to decord, then PyAV
(``DecodePool``), and only then is reported as a bad video.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from cache import UserError

PACKAGE = "PyNvVideoCodec"
PIN = "PyNvVideoCodec==2.2.4"
INSTALL = f"pip install 'ta2n-cache[gpu]' (or pip install {PIN})"
DECODERS = ("auto", "cpu", "gpu")


def gpu_decoder_problem() -> str | None:
    """Why the GPU decoder cannot be used here (one line), or None when it can."""
    import torch

    if importlib.util.find_spec(PACKAGE) is None:
        return f"{PACKAGE} is not installed: {INSTALL}"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    try:
        import PyNvVideoCodec  # noqa: F401  (its import checks the driver's NVDEC libraries)
    except Exception as e:  # a driver without the video libraries fails here, not at decode
        return f"{PACKAGE} does not load: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None


def choose_decoder(requested: str, echo=print, problem=None) -> str:
    """The decoder a run uses, "cpu" or "gpu", for ``--decoder requested``.

    Args:
        requested: "cpu" (decord, then PyAV), "gpu" (NVDEC, refused with a one-line
            ``UserError`` when unusable) or "auto" (the GPU when usable, else the CPU).
        echo: where "auto" says which it picked (one line).
        problem: returns why the GPU decoder is unusable, or None (default:
            ``gpu_decoder_problem``, looked up at call time so tests can replace it).
    """
    if requested not in DECODERS:
        raise UserError(f"--decoder {requested!r}: choose one of {', '.join(DECODERS)}")
    if requested == "cpu":
        return "cpu"
    why = (problem or gpu_decoder_problem)()
    if requested == "gpu":
        if why:
            raise UserError(f"--decoder gpu: the GPU decoder is unusable: {why}")
        return "gpu"
    if why:
        echo(f"decoder: cpu (decord, then PyAV; --decoder auto: {why})")
        return "cpu"
    echo(f"decoder: gpu ({PACKAGE}, NVDEC; clips it rejects go to decord, then PyAV)")
    return "gpu"


def read_gpu(path: str, pick) -> tuple[int, dict[int, np.ndarray]]:
    """Decode the frames ``pick(n)`` of the video at ``path`` on the GPU of this process's
    LOCAL_RANK (0 without torchrun): (frame count, {index: RGB uint8 (H, W, 3)})."""
    import PyNvVideoCodec as nvc
    import torch

    decoder = nvc.SimpleDecoder(path, gpu_id=int(os.environ.get("LOCAL_RANK", 0)),
                                use_device_memory=False,
                                output_color_type=nvc.OutputColorType.RGB)
    n = len(decoder)
    if n < 1:
        raise ValueError("the video has no frames")
    wanted = pick(n)
    decoded = decoder.get_batch_frames_by_index(wanted)
    if len(decoded) != len(wanted):
        raise ValueError(f"the GPU decoder returned {len(decoded)} of {len(wanted)} frames")
    return n, {i: _hwc_uint8(torch.from_dlpack(f).cpu().numpy()) for i, f in zip(wanted, decoded)}


def _hwc_uint8(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 from an interleaved (H, W, 3) or planar (3, H, W) frame."""
    if frame.ndim == 3 and frame.shape[0] == 3 and frame.shape[-1] != 3:
        frame = frame.transpose(1, 2, 0)
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"the GPU decoder gave a {frame.dtype} frame of shape {frame.shape}")
    return np.ascontiguousarray(frame)
