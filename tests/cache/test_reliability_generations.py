"""Issue 24 (cache part): a cache rebuilt under a reader is noticed at the reader's next batch,
duplicate class names are refused at open, the feature fingerprint tells caches of other
features apart (and ignores what does not change the features), and `--overwrite` never
follows a link out of a cache nor deletes anything before it has checked everything."""

import os

import pytest
import zarr
from cache_testing import CLASSES, SHAPE, make_rows, row_values

from cache import FeatureCache, UserError
from cache.features import check_same_features, feature_fingerprint


def build(path, backend=None, attrs=None, classes=CLASSES, overwrite=False):
    video_ids, splits, labels = make_rows()
    cache = FeatureCache.create(path, video_ids=video_ids, splits=splits, labels=labels,
                                classes=classes, shape=SHAPE, backend=backend, attrs=attrs,
                                overwrite=overwrite)
    for row in range(len(video_ids)):
        cache.write_row(row, row_values(row))
    return cache


# ------------------------------------------------------------------------------ item 5
def test_a_reader_stops_when_the_cache_is_rebuilt_under_it(tmp_path):
    path = str(tmp_path / "c.zarr")
    build(path).close()
    with FeatureCache.open(path) as reader:
        reader.check_unchanged()  # nothing happened yet
        build(path, overwrite=True).close()  # another command's --overwrite
        with pytest.raises(UserError, match="rebuilt .*while this command read it"):
            reader.check_unchanged()


def test_each_creation_gets_its_own_generation(cache_path, backend):
    build(cache_path, backend).close()
    with FeatureCache.open(cache_path) as cache:
        first = cache.generation
    build(cache_path, backend, overwrite=True).close()
    with FeatureCache.open(cache_path) as cache:
        assert cache.generation and cache.generation != first


def test_a_removed_cache_stops_its_reader(tmp_path):
    import shutil

    path = str(tmp_path / "c.zarr")
    build(path).close()
    with FeatureCache.open(path) as reader:
        shutil.rmtree(path)
        with pytest.raises(UserError, match="removed or rebuilt"):
            reader.check_unchanged()


# ------------------------------------------------------------------------------ item 6
def test_duplicate_class_names_are_refused_at_open(tmp_path):
    path = str(tmp_path / "c.zarr")
    build(path).close()
    group = zarr.open_group(path, mode="r+")
    group.attrs["classes"] = ["jump", "run", "jump"]  # edited, or written by another program
    with pytest.raises(UserError, match="class 'jump' is listed twice"):
        FeatureCache.open(path)


def test_duplicate_class_names_are_refused_at_creation(tmp_path):
    with pytest.raises(UserError, match="class 'run' is listed twice"):
        build(str(tmp_path / "c.zarr"), classes=["jump", "run", "run"])


# ------------------------------------------------------------------------------ item 1's core
FEATURES = {"backbone": "resnet50", "weights_state_sha256": "a" * 64, "frames": 4,
            "image_size": 224, "resize": 256, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2],
            "interpolation": "bilinear", "sampling": "tsn-centre", "pool_to": None,
            "dataset": "ucf101", "created": "2026-01-01T00:00:00"}


def test_the_fingerprint_tells_other_weights_apart_and_ignores_the_dataset():
    base = feature_fingerprint(FEATURES, "a.zarr")
    other_weights = feature_fingerprint({**FEATURES, "weights_state_sha256": "b" * 64}, "b.zarr")
    other_dataset = feature_fingerprint({**FEATURES, "dataset": "hmdb51",
                                         "created": "2026-02-02T00:00:00"}, "c.zarr")
    assert base["digest"] != other_weights["digest"]
    assert base["digest"] == other_dataset["digest"]  # cross-dataset evaluation is legitimate
    with pytest.raises(UserError) as refused:
        check_same_features(base, other_weights, what="checkpoint x.pt")
    message = refused.value.message
    assert "a.zarr" in message and "b.zarr" in message and "weights_state_sha256" in message
    assert "--allow-other-features" in message
    assert check_same_features(base, other_dataset, what="checkpoint x.pt") is None


def test_other_features_are_allowed_only_when_asked_and_then_loudly():
    base = feature_fingerprint(FEATURES, "a.zarr")
    other = feature_fingerprint({**FEATURES, "pool_to": 4}, "b.zarr")
    warning = check_same_features(base, other, what="checkpoint x.pt", allow_other=True)
    assert warning.startswith("WARNING") and "pool_to" in warning


def test_a_checkpoint_without_a_fingerprint_is_scored_with_a_warning():
    current = feature_fingerprint(FEATURES, "a.zarr")
    warning = check_same_features(None, current, what="checkpoint old.pt")
    assert "records no feature fingerprint" in warning and "cannot check" in warning


def synthetic(path, seed):
    from cache.synthetic import SynthConfig, generate_synthetic

    generate_synthetic(str(path), SynthConfig(channels=4, frames=4, size=4, train_classes=2,
                                              val_classes=0, test_classes=2,
                                              videos_per_class=2, seed=seed), progress=False)
    return str(path)


def test_synthetic_caches_of_other_generators_differ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # synth remembers its cache under ./caches
    a = synthetic(tmp_path / "a.zarr", seed=1)
    b = synthetic(tmp_path / "b.zarr", seed=2)
    with FeatureCache.open(a) as ca, FeatureCache.open(b) as cb:
        fa, fb = feature_fingerprint(ca.attrs, ca.path), feature_fingerprint(cb.attrs, cb.path)
    assert fa["digest"] != fb["digest"]
    assert "windows" not in str(fa)  # the per-row ground truth is not a feature setting


# ------------------------------------------------------------------------------ item 8
@pytest.mark.parametrize("link_at", ["features", "features/c"])
def test_overwrite_never_follows_a_link_and_deletes_nothing_first(tmp_path, link_at):
    path = tmp_path / "c.zarr"
    build(str(path)).close()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    target = path / link_at
    os.rename(target, precious / "moved")  # the real entry now lives outside the cache
    os.symlink(precious, target)
    before = sorted(os.listdir(path))
    with pytest.raises(UserError, match="symbolic link"):
        build(str(path), overwrite=True)
    assert sorted(os.listdir(path)) == before  # nothing deleted
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert os.path.islink(target)


# ------------------------------------------------------------------------------ item 13
@pytest.mark.parametrize("array", ["label", "video_id", "split"])
def test_an_edited_index_array_is_named_at_open(tmp_path, array):
    path = str(tmp_path / "c.zarr")
    build(path).close()
    group = zarr.open_group(path, mode="r+")
    values = group[array][:]
    group[array][:] = values[::-1]  # valid values, other rows: only a checksum can tell
    with pytest.raises(UserError, match=f"{array} .*checksum"):
        FeatureCache.open(path)


@pytest.mark.parametrize("array", ["label", "video_id", "split"])
def test_a_damaged_index_chunk_is_one_line_naming_the_array(tmp_path, array):
    path = tmp_path / "c.zarr"
    build(str(path)).close()
    chunk = path / array / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2:] = b"\xff" * (len(data) - len(data) // 2)
    chunk.write_bytes(bytes(data))
    with pytest.raises(UserError, match=array):
        FeatureCache.open(str(path))


# ------------------------------------------------------------------------------ item 14
def edit_metadata(path, change):
    """Rewrite every array's zarr.json (and the group's attributes) through ``change``."""
    import json

    for meta in path.glob("*/zarr.json"):
        payload = json.loads(meta.read_text())
        change(meta.parent.name, payload)
        meta.write_text(json.dumps(payload))


def test_a_huge_edited_row_size_is_refused_at_open(tmp_path):
    path = tmp_path / "c.zarr"
    build(str(path)).close()

    def huge(name, payload):
        if name == "features":
            payload["shape"][3:] = [100000, 100000]
            payload["chunk_grid"]["configuration"]["chunk_shape"][3:] = [100000, 100000]
    edit_metadata(path, huge)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs.update(height=100000, width=100000)
    with pytest.raises(UserError, match="one row .* GB"):
        FeatureCache.open(str(path))


def test_a_huge_edited_row_count_is_refused_at_open(tmp_path):
    path = tmp_path / "c.zarr"
    build(str(path)).close()
    edit_metadata(path, lambda name, payload: payload["shape"].__setitem__(0, 10**11))
    with pytest.raises(UserError, match="rows"):
        FeatureCache.open(str(path))


# ------------------------------------------------------------------------------ also seen
def test_the_lock_file_is_gone_after_a_failed_run(tmp_path):
    from cache.paths import lock_path, writer_lock

    with pytest.raises(RuntimeError):
        with writer_lock(tmp_path / "c.zarr"):
            assert os.path.exists(lock_path(tmp_path / "c.zarr"))
            raise RuntimeError("the extraction failed")
    assert not os.path.exists(lock_path(tmp_path / "c.zarr"))
    with writer_lock(tmp_path / "c.zarr"):  # and the next run takes it again
        pass
