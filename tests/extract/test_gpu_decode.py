"""--decoder auto|cpu|gpu: which decoder a run picks, the refusals, and the GPU reader's fallback to
the CPU decoders (a fake GPU reader: this machine has no GPU, so NVDEC itself is untested here)."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import numpy as np
import pytest
import torch

from cache import FeatureCache, UserError
from extract import decode, gpu_decode
from extract.decode import DecodedVideo, DecodeFailure, DecodePool, DecodeTask
from extract.gpu_decode import choose_decoder, gpu_decoder_problem
from extract.pipeline import ExtractConfig, RunPlan, Shard, run_extract

REJECTED = "jump/v0"  # the clip the fake GPU decoder refuses


def no_cuda():
    return "no CUDA device is visible (torch.cuda.is_available() is False)"


def test_auto_without_a_usable_gpu_picks_the_cpu_and_says_why():
    said = []
    assert choose_decoder("auto", said.append, problem=no_cuda) == "cpu"
    assert said == ["decoder: cpu (decord, then PyAV; --decoder auto: no CUDA device is visible "
                    "(torch.cuda.is_available() is False))"]


def test_auto_with_a_usable_gpu_picks_it_and_says_so():
    said = []
    assert choose_decoder("auto", said.append, problem=lambda: None) == "gpu"
    assert len(said) == 1 and said[0].startswith("decoder: gpu (PyNvVideoCodec")


def test_cpu_is_chosen_silently_without_probing_the_gpu():
    said = []
    probe = pytest.fail  # probing the GPU for --decoder cpu would fail the test
    assert choose_decoder("cpu", said.append, problem=probe) == "cpu" and said == []


def test_gpu_without_cuda_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # "installed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as refused:
        choose_decoder("gpu", print)
    assert str(refused.value) == ("--decoder gpu: the GPU decoder is unusable: no CUDA device is "
                                  "visible (torch.cuda.is_available() is False)")


def test_gpu_with_the_package_missing_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: None if name == "PyNvVideoCodec" else real(name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_decoder_problem() == ("PyNvVideoCodec is not installed: pip install "
                                     "'ta2n-cache[gpu]' (or pip install PyNvVideoCodec==2.2.4)")
    with pytest.raises(UserError, match=r"^--decoder gpu: .*pip install 'ta2n-cache\[gpu\]'"):
        choose_decoder("gpu", print)


def test_an_unknown_decoder_is_refused():
    with pytest.raises(UserError, match="choose one of auto, cpu, gpu"):
        choose_decoder("nvdec", print)


def fake_gpu_reader(path: str, pick):
    """Refuses REJECTED's file; otherwise frames of the true count and size, all of value 7
    (so a row made from them is recognisable). The corrupt file fails here too (PyAV raises)."""
    if f"{REJECTED}." in path:
        raise RuntimeError("CUVID: unsupported stream")
    n, frames = decode._read_pyav(path, pick)
    return n, {i: np.full_like(frame, 7) for i, frame in frames.items()}


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setitem(decode.READERS, "gpu", fake_gpu_reader)
    monkeypatch.setattr(gpu_decode, "gpu_decoder_problem", lambda: None)


def file_task(root, video_id: str, row: int = 0) -> DecodeTask:
    folder = root / video_id
    path = next(p for p in folder.parent.iterdir() if p.stem == folder.name)
    return DecodeTask(row, video_id, str(path), "file", 8, resize=72, image_size=64)


def test_a_clip_the_gpu_rejects_is_decoded_by_the_cpu_exactly_as_the_cpu_path(dataset, fake_gpu):
    root, _ = dataset
    tasks = [file_task(root, REJECTED, 0), file_task(root, "walk/v1", 1)]
    gpu = {r.video_id: r for r in DecodePool(workers=0, decoder="gpu").imap(tasks)}
    cpu = {r.video_id: r for r in DecodePool(workers=0, decoder="cpu").imap(tasks)}
    rejected = gpu[REJECTED]
    assert rejected.method == "decord"
    assert rejected.fallback_reason == "gpu: RuntimeError: CUVID: unsupported stream"
    np.testing.assert_array_equal(rejected.views, cpu[REJECTED].views)
    accepted = gpu["walk/v1"]  # the GPU's frames are the ones used, cut like the CPU's
    assert accepted.method == "gpu" and accepted.fallback_reason is None
    assert accepted.views.shape == cpu["walk/v1"].views.shape == (1, 8, 3, 64, 64)
    assert accepted.views.dtype == np.uint8 and (accepted.views == 7).all()


def test_a_clip_every_decoder_rejects_is_reported_with_each_reason(dataset, fake_gpu):
    root, _ = dataset
    [failure] = DecodePool(workers=0, decoder="gpu").imap([file_task(root, "swim/v1")])
    assert isinstance(failure, DecodeFailure)
    reasons = failure.reason.split("; ")
    assert [r.split(":")[0] for r in reasons] == ["gpu", "decord", "pyav"]


def test_frame_folders_never_go_to_the_gpu(dataset, fake_gpu):
    root, _ = dataset
    task = DecodeTask(0, "run/v1", str(root / "run" / "v1"), "frames", 8, resize=72,
                      image_size=64)
    [result] = DecodePool(workers=0, decoder="gpu").imap([task])
    assert isinstance(result, DecodedVideo) and result.method == "frames"


def test_the_run_plan_carries_the_decoder():
    config = ExtractConfig(dataset="custom", root="x", decoder="gpu")
    assert RunPlan.make(config, torch.device("cpu")).decoder == "gpu"
    assert RunPlan.make(replace(config, decoder="cpu"), torch.device("cpu")).decoder == "cpu"


def rows_by_video(path) -> dict[str, np.ndarray]:
    with FeatureCache.open(path) as cache:
        return {str(v): cache.read_row(i) for i, v in enumerate(cache.video_ids)
                if cache.done[i]}


@pytest.mark.slow
def test_extract_with_the_gpu_decoder_falls_back_per_clip_and_records_it(
        dataset, weights_file, fake_gpu, tmp_path):
    root, split_dir = dataset
    base = ExtractConfig(dataset="custom", root=str(root), split_dir=str(split_dir),
                         backbone="resnet18", weights=str(weights_file), frames=2,
                         image_size=32, resize=36, workers=0)
    quiet = []
    cpu = run_extract(replace(base, out=str(tmp_path / "cpu.zarr")), torch.device("cpu"),
                      Shard(0, 1, 0), echo=quiet.append)
    gpu = run_extract(replace(base, out=str(tmp_path / "gpu.zarr"), decoder="auto"),
                      torch.device("cpu"), Shard(0, 1, 0), echo=quiet.append)
    assert "decoder: gpu (PyNvVideoCodec, NVDEC; clips it rejects go to decord, then PyAV)" \
        in quiet
    cpu_rows, gpu_rows = rows_by_video(tmp_path / "cpu.zarr"), rows_by_video(tmp_path / "gpu.zarr")
    assert sorted(cpu_rows) == sorted(gpu_rows)
    np.testing.assert_array_equal(gpu_rows[REJECTED], cpu_rows[REJECTED])  # decoded on the CPU
    for folder in ("run/v1", "walk/v0"):  # frame folders: PIL on both paths
        np.testing.assert_array_equal(gpu_rows[folder], cpu_rows[folder])
    on_gpu = ["jump/v1", "run/v0", "swim/v0", "walk/v1"]  # constant frames: identical rows
    for video in on_gpu:
        np.testing.assert_array_equal(gpu_rows[video], gpu_rows[on_gpu[0]])
        assert not np.array_equal(gpu_rows[video], cpu_rows[video])
    assert [f["video"] for f in gpu.fallbacks] == [REJECTED]
    assert [f["video"] for f in gpu.failed] == [f["video"] for f in cpu.failed] == ["swim/v1"]
    assert gpu.failed[0]["reason"].startswith("gpu: ")
    with FeatureCache.open(tmp_path / "gpu.zarr") as cache:
        assert cache.attrs["extract_config"]["decoder"] == "gpu"  # the one used, not "auto"
