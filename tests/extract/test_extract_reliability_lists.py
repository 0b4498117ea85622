"""Issue 24 (extract part): rerunning extract after the split lists changed (a line removed, a
video moved between splits, a line added) is refused with the difference named, instead of
reporting success over the old rows; `--overwrite` rebuilds from the new lists."""

import pytest
from reliability_helpers import extract, one_line

from cache import FeatureCache


def write_lists(folder, **split_lines):
    folder.mkdir(exist_ok=True)
    for split in ("train", "val", "test"):
        (folder / f"{split}list.txt").write_text("".join(f"{line}\n" for line in
                                                         split_lines.get(split, [])))
    return folder


ORIGINAL = dict(train=["jump/v0", "jump/v1"], test=["run/v0"])


@pytest.mark.slow
@pytest.mark.parametrize("changed, named", [
    (dict(train=["jump/v0"], test=["run/v0"]), "no longer listed (e.g. jump/v1)"),
    (dict(train=["jump/v0"], test=["run/v0", "jump/v1"]), "jump/v1 moved from train to test"),
    (dict(train=["jump/v0", "jump/v1"], test=["run/v0"], val=["run/v1x"]), None),
])
def test_changed_split_lists_are_refused_with_the_difference(tiny_dataset, weights_file,
                                                             tmp_path, changed, named):
    root, _ = tiny_dataset
    lists = write_lists(tmp_path / "lists", **ORIGINAL)
    out = tmp_path / "c.zarr"
    assert extract(root, lists, out, weights_file, tmp_path).exit_code == 0
    write_lists(lists, **changed)
    result = extract(root, lists, out, weights_file, tmp_path)
    if named is None:  # a listed video that does not exist changes nothing the cache holds
        assert result.exit_code == 0, result.output
        return
    message = one_line(result)
    assert "split lists changed" in message and named in message and "--overwrite" in message
    with FeatureCache.open(out) as cache:  # untouched
        assert list(cache.video_ids) == ["jump/v0", "jump/v1", "run/v0"]
    rebuilt = extract(root, lists, out, weights_file, tmp_path, "--overwrite")
    assert rebuilt.exit_code == 0, rebuilt.output
    with FeatureCache.open(out) as cache:
        assert dict(zip(cache.video_ids, cache.splits)) == {
            line: split for split, lines in changed.items() for line in lines}


@pytest.mark.slow
def test_a_line_added_to_a_list_is_refused(tiny_dataset, weights_file, tmp_path):
    root, _ = tiny_dataset
    lists = write_lists(tmp_path / "lists", train=["jump/v0"], test=["run/v0"])
    out = tmp_path / "c.zarr"
    assert extract(root, lists, out, weights_file, tmp_path).exit_code == 0
    write_lists(lists, train=["jump/v0", "jump/v1"], test=["run/v0"])
    message = one_line(extract(root, lists, out, weights_file, tmp_path))
    assert "1 listed videos are not in the cache (e.g. jump/v1)" in message


# ------------------------------------------------------------------------------ item 18
def test_a_byte_order_mark_makes_no_phantom_class(tiny_dataset, tmp_path):
    from extract.datasets import find_videos

    root, _ = tiny_dataset
    lists = write_lists(tmp_path / "lists", **ORIGINAL)
    (lists / "trainlist.txt").write_bytes(b"\xef\xbb\xbf" + (lists / "trainlist.txt").read_bytes())
    found = find_videos("custom", root, split_dir=lists)
    assert found.classes == ["jump", "run"] and not found.missing


def test_lines_with_an_extension_are_explained_with_the_paths_looked_for(tiny_dataset,
                                                                        weights_file, tmp_path):
    root, _ = tiny_dataset
    lists = write_lists(tmp_path / "lists", train=["jump/v0.mp4", "jump/v1.mp4"],
                        test=["run/v0.mp4"])
    message = one_line(extract(root, lists, tmp_path / "c.zarr", weights_file, tmp_path))
    assert "'<class>/<stem>' without extension" in message and "jump/v0.mp4" in message
    assert f"{root}/jump/v0.mp4" in message  # where it looked
    assert "error report" not in message
