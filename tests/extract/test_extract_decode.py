"""Decoding: the frames and crops each reader returns, failures, timeouts and crashes in workers."""

import os

import numpy as np
import pytest
import torch
from extract_fakes import crash_in_decord, hang_in_decord
from extract_testing import decode_all, frame_image
from torchvision.transforms.v2 import functional as tvf

from extract.decode import DecodedVideo, DecodeFailure, DecodePool, DecodeTask, decode_task
from extract.sampling import centre_indices, plan_views

SIZES = dict(resize=72, image_size=64)


def task_for(root, video_id, row=0, aug_views=0, flip=True):
    folder = root / video_id
    if folder.is_dir():
        return DecodeTask(row, video_id, str(folder), "frames", 8, aug_views, 0, flip=flip,
                          **SIZES)
    path = next(p for p in folder.parent.iterdir() if p.stem == folder.name)
    return DecodeTask(row, video_id, str(path), "file", 8, aug_views, 0, flip=flip, **SIZES)


def reference_crops(path, indices, top=4, left=4, flip=False):
    """The test's own preprocessing: resize 72x72 (bilinear, antialiased, uint8), crop 64."""
    frames = torch.from_numpy(decode_all(path)[list(indices)]).permute(0, 3, 1, 2)
    resized = tvf.resize(frames, [72, 72], antialias=True)
    crop = resized[:, :, top:top + 64, left:left + 64]
    return (crop.flip(-1) if flip else crop).numpy()


@pytest.mark.parametrize("video_id", ["jump/v0", "jump/v1", "swim/v0", "run/v1"])
def test_readers_return_the_sampled_frames_resized_and_centre_cropped(dataset, video_id):
    root, _ = dataset
    task = task_for(root, video_id)
    methods = ["frames"] if task.kind == "frames" else ["decord", "pyav"]
    n = len(decode_all(task.path))
    expected = reference_crops(task.path, centre_indices(n, 8))
    for method in methods:
        out = decode_task(task, method)
        assert out.n_frames == n and out.method == method
        assert out.views.shape == (1, 8, 3, 64, 64) and out.views.dtype == np.uint8
        np.testing.assert_array_equal(out.views[0], expected)


def test_frame_folders_are_read_in_natural_name_order(dataset):
    root, _ = dataset
    task = task_for(root, "run/v1")  # img_1.png ... img_26.png
    out = decode_task(task, "frames")
    seed = sorted(["jump/v0", "jump/v1", "run/v0", "run/v1", "swim/v0", "swim/v1", "walk/v0",
                   "walk/v1"]).index("run/v1")
    stamps = [frame_image(seed, i)[0, 0, 0] for i in centre_indices(26, 8)]
    # the top-left block carries the frame number: resized, it is still uniform at the corner
    assert [int(v) for v in out.views[0, :, 0, 0, 0]] == [int(s) for s in stamps]


def test_augmented_views_follow_their_plans(dataset):
    root, _ = dataset
    task = task_for(root, "walk/v1", aug_views=3)
    out = decode_task(task, "decord")
    plans = plan_views(36, frames=8, video_id="walk/v1", aug_views=3, seed=0, **SIZES)
    assert out.views.shape == (4, 8, 3, 64, 64)
    # this seed's views cover what the check must see: a flipped and an unflipped augmented
    # view, and crops off the centre
    assert {p.flip for p in plans[1:]} == {True, False}
    assert any((p.top, p.left) != (plans[0].top, plans[0].left) for p in plans[1:])
    for view, plan in zip(out.views, plans):
        np.testing.assert_array_equal(
            view, reference_crops(task.path, plan.indices, plan.top, plan.left, plan.flip))


@pytest.mark.slow
def test_corrupt_file_fails_in_both_decoders_with_reasons(dataset):
    root, _ = dataset
    results = list(DecodePool(workers=1, timeout=30).imap([task_for(root, "swim/v1", row=5)]))
    assert len(results) == 1 and isinstance(results[0], DecodeFailure)
    assert results[0].row == 5
    assert "decord:" in results[0].reason and "pyav:" in results[0].reason


@pytest.mark.slow
def test_hanging_decord_is_killed_and_pyav_decodes_the_video(dataset):
    root, _ = dataset
    pool = DecodePool(workers=1, timeout=2.0, decode_fn=hang_in_decord)
    task = task_for(root, "jump/v0")
    (result,) = list(pool.imap([task]))
    assert isinstance(result, DecodedVideo) and result.method == "pyav"
    assert "decord: timed out after 2 s" in result.fallback_reason
    np.testing.assert_array_equal(result.views, decode_task(task, "decord").views)
    assert len(pool.killed_pids) == 1
    with pytest.raises(ProcessLookupError):  # the hung worker is gone
        os.kill(pool.killed_pids[0], 0)


@pytest.mark.slow
def test_crashing_worker_is_replaced_and_pyav_decodes_the_video(dataset):
    root, _ = dataset
    pool = DecodePool(workers=1, timeout=30, decode_fn=crash_in_decord)
    tasks = [task_for(root, v, row=i) for i, v in enumerate(["jump/v0", "walk/v1", "run/v1"])]
    results = {r.row: r for r in pool.imap(tasks)}
    assert set(results) == {0, 1, 2}
    assert results[0].method == results[1].method == "pyav"
    assert "worker process died (exit code 3)" in results[0].fallback_reason
    assert results[2].method == "frames" and results[2].fallback_reason is None


@pytest.mark.slow
def test_pool_and_inline_decoding_agree_on_every_video(dataset):
    root, _ = dataset
    ids = ["jump/v0", "jump/v1", "run/v0", "run/v1", "swim/v0", "swim/v1", "walk/v0"]
    tasks = [task_for(root, v, row=i, aug_views=1) for i, v in enumerate(ids)]
    pooled = {r.row: r for r in DecodePool(workers=2, timeout=30).imap(tasks)}
    inline = {r.row: r for r in DecodePool(workers=0).imap(tasks)}
    assert set(pooled) == set(inline) == set(range(len(ids)))
    for row in range(len(ids)):
        if ids[row] == "swim/v1":
            assert isinstance(pooled[row], DecodeFailure) and isinstance(inline[row], DecodeFailure)
            continue
        np.testing.assert_array_equal(pooled[row].views, inline[row].views)
