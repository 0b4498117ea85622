"""Issue 10, one line instead of a traceback (cache part): unwritable output paths, damaged
metadata caught at open, messages that say what is really wrong, `synth` option ranges."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cache_testing import CLASSES, SHAPE, make_rows, row_values
from click.testing import CliRunner

import cli
from cache import FeatureCache, UserError
from cache.errors import CacheInUse
from cache.paths import check_writable, lock_path, writer_lock
from cache.synthetic import SynthConfig

REPO = Path(__file__).resolve().parents[2]


def one_line_failure(*args):
    result = CliRunner().invoke(cli.cli, [*map(str, args)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


# --------------------------------------------------------------------- writable output paths
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_check_writable_refuses_paths_that_cannot_be_written(tmp_path, kind):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "a_folder").mkdir()
    with pytest.raises(UserError, match="a_file is a file, not a folder"):
        check_writable(a_file / "sub" / "out", kind)
    with pytest.raises(UserError, match="/proc is not writable"):
        check_writable("/proc/ta2n-out", kind)
    wrong = tmp_path / ("a_folder" if kind == "file" else "a_file")
    with pytest.raises(UserError, match=f"it is a {'folder, not a file' if kind == 'file' else 'file, not a folder'}"):  # noqa: E501
        check_writable(wrong, kind)
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(UserError, match="dangling or looping symbolic link"):
        check_writable(tmp_path / "loop", kind)
    before = sorted(os.listdir(tmp_path))
    check_writable(tmp_path / "new" / "deeper" / "out", kind)  # fine, and leaves nothing
    check_writable(tmp_path / "a_folder" / "out", kind)
    assert sorted(os.listdir(tmp_path)) == before and os.listdir(tmp_path / "a_folder") == []


def test_synth_checks_its_output_before_working(tmp_path):
    (tmp_path / "plain").write_text("x")
    output = one_line_failure("synth", "--out", tmp_path / "plain" / "s.zarr")
    assert "plain is a file, not a folder" in output
    output = one_line_failure("synth", "--out", "/proc/s.h5", "--backend", "hdf5")
    assert "cannot write --out /proc/s.h5" in output


def test_an_hdf5_cache_in_a_missing_folder_is_created_like_a_zarr_one(tmp_path):
    path = tmp_path / "not" / "yet" / "c.h5"
    video_ids, splits, labels = make_rows(3)
    FeatureCache.create(path, video_ids=video_ids, splits=splits, labels=labels,
                        classes=CLASSES, shape=SHAPE).close()
    assert FeatureCache.open(path).backend == "hdf5"


# --------------------------------------------------------------------- damaged metadata
def make_cache(path, backend=None, n=9):
    video_ids, splits, labels = make_rows(n)
    with FeatureCache.create(path, video_ids=video_ids, splits=splits, labels=labels,
                             classes=CLASSES, shape=SHAPE, backend=backend) as cache:
        cache.write_row(0, row_values(0))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_a_truncated_group_zarr_json_is_one_line_naming_it(tmp_path):
    path = tmp_path / "c.zarr"
    make_cache(path)
    truncate(path / "zarr.json")
    assert "c.zarr: zarr.json is damaged" in one_line_failure("info", path)


def test_a_truncated_array_zarr_json_is_one_line_naming_it(tmp_path):
    path = tmp_path / "c.zarr"
    make_cache(path)
    truncate(path / "features" / "zarr.json")
    assert "features/zarr.json is damaged" in one_line_failure("info", path)


def edit_attrs(path: Path, backend: str, **values) -> None:
    """Change attributes by hand, as a user editing the metadata would."""
    if backend == "zarr":
        meta = json.loads((path / "zarr.json").read_text())
        meta["attributes"].update(values)
        (path / "zarr.json").write_text(json.dumps(meta))
    else:
        import h5py

        with h5py.File(path, "r+") as f:
            for key, value in values.items():
                f.attrs[key] = json.dumps(value)


@pytest.mark.parametrize("edit, message", [
    ({"dtype": "float32"}, "attribute dtype says 'float32' but the arrays hold 'float16'"),
    ({"frames": 16}, "attribute frames says 16 but the arrays hold 4"),
    ({"classes": CLASSES[:2]}, "row 2 has label 2, but attribute classes lists 2 classes"),
    ({"classes": "jump"}, "attribute classes must be a list of class names"),
])
def test_edited_attributes_are_refused_at_open(tmp_path, backend, edit, message):
    path = tmp_path / ("c.h5" if backend == "hdf5" else "c.zarr")
    make_cache(path, backend)
    edit_attrs(path, backend, **edit)
    assert message in one_line_failure("info", path)


def test_a_truncated_hdf5_file_is_called_damaged_not_in_use(tmp_path):
    path = tmp_path / "c.h5"
    make_cache(path)
    truncate(path, 0.6)
    output = one_line_failure("info", path)
    assert "damaged HDF5 file" in output and "in use" not in output


def test_the_hdf5_lock_refusal_advises_waiting_not_overwrite(tmp_path):
    path = str(tmp_path / "c.h5")
    make_cache(path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, h5py\n"
        f"f = h5py.File({path!r}, 'r+')\n"
        "print('open', flush=True)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(CacheInUse) as refused:
            FeatureCache.open(path)
    finally:
        holder.communicate("")
    message = refused.value.message.replace(path, "")
    assert "in use by another process" in message and "wait for it" in message
    assert "overwrite" not in message


# --------------------------------------------------------------------- interrupted creation, lock
def test_an_hdf5_creation_killed_half_way_leaves_no_cache_and_is_redone(tmp_path, monkeypatch):
    from cache.hdf5_store import HDF5Backend

    path = tmp_path / "c.h5"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for kill -9 while the datasets are being made

    monkeypatch.setattr(HDF5Backend, "_create_dataset", staticmethod(killed))
    with pytest.raises(KeyboardInterrupt):
        make_cache(path)
    monkeypatch.undo()
    assert not path.exists()  # only the temporary file, which the next creation replaces
    make_cache(path)
    assert FeatureCache.open(path).done.tolist() == [True] + [False] * 8


def test_a_second_writer_is_refused_while_the_lock_is_held_and_a_killed_holder_frees_it(tmp_path):
    out = tmp_path / "c.zarr"
    holder = subprocess.Popen([sys.executable, "-c", (
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "from cache.paths import writer_lock\n"
        f"with writer_lock({str(out)!r}):\n"
        "    print('held', flush=True)\n"
        "    sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    output = one_line_failure("synth", "--out", out, "--train-classes", "2", "--val-classes",
                              "0", "--test-classes", "0", "--videos-per-class", "1")
    assert "is being written by another process" in output
    assert lock_path(out) in output and not out.exists()
    holder.kill()  # kill -9: the kernel drops the lock with the process
    holder.wait()
    with writer_lock(out):
        pass


# --------------------------------------------------------------------- synth options
@pytest.mark.parametrize("option, value", [
    ("--train-classes", "-1"), ("--videos-per-class", "0"), ("--aug-views", "-2"),
    ("--noise", "-0.5"), ("--length", "-1"), ("--frames", "2"),
])
def test_synth_refuses_out_of_range_options(tmp_path, option, value):
    result = CliRunner().invoke(cli.cli, ["synth", "--out", str(tmp_path / "s.zarr"),
                                          option, value])
    assert result.exit_code == 2 and "Invalid value" in result.output
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("changes, message", [
    ({"train_classes": -1}, "--train-classes must be 0 or more"),
    ({"train_classes": 0, "val_classes": 0, "test_classes": 0}, "at least one class"),
    ({"videos_per_class": 0}, "--videos-per-class and --patterns must be at least 1"),
    ({"noise": -1.0}, "--background and --noise must be >= 0"),
])
def test_synth_config_checks_the_same_ranges_for_api_users(changes, message):
    with pytest.raises(UserError, match=message):
        SynthConfig(**changes).check()
