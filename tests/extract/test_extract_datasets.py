"""Split lists -> records: labels, splits, video ids, where files are found, what is missing."""

import pytest
from extract_testing import SPLIT_LINES

from cache import UserError
from extract.datasets import SPLITS_DIR, find_videos


def test_custom_dataset_records_labels_and_missing(dataset):
    root, split_dir = dataset
    found = find_videos("custom", root, split_dir=split_dir)
    assert found.classes == ["jump", "run", "swim", "walk"]  # split order, then natural order
    ids = [r.video_id for r in found.records]
    expected = [line for split in ("train", "val", "test") for line in SPLIT_LINES[split]
                if line != "swim/gone"]
    assert ids == expected
    assert found.missing == ["swim/gone"]
    for record in found.records:
        assert found.classes[record.label] == record.video_id.split("/")[0] == record.class_name
        assert record.video_id in SPLIT_LINES[record.split]
    kinds = {r.video_id: r.kind for r in found.records}
    assert kinds["run/v1"] == kinds["walk/v0"] == "frames"
    assert kinds["jump/v1"] == "file" and found.records[1].path.endswith("jump/v1.webm")


def test_splits_and_limit_select_videos_but_labels_stay_stable(dataset):
    root, split_dir = dataset
    found = find_videos("custom", root, split_dir=split_dir, splits=("test", "train"), limit=1)
    assert [(r.split, r.video_id) for r in found.records] == [("train", "jump/v0"),
                                                               ("test", "walk/v0")]
    assert found.classes == ["jump", "run", "walk"]
    assert found.classes[found.records[1].label] == "walk"


def test_kinetics_class_folders_with_spaces_or_underscores(tmp_path):
    lines = (SPLITS_DIR / "kinetics_CMN" / "trainlist03.txt").read_text().splitlines()
    first_class = lines[0].split("/")[0]
    assert " " in first_class  # "air drumming"
    a, b = lines[0].split("/")[1], lines[1].split("/")[1]
    (tmp_path / first_class).mkdir()
    (tmp_path / first_class / f"{a}.mp4").touch()
    (tmp_path / first_class.replace(" ", "_")).mkdir()
    (tmp_path / first_class.replace(" ", "_") / f"{b}.mkv").touch()
    found = find_videos("kinetics", tmp_path, splits=("train",), limit=2)
    assert [r.video_id for r in found.records] == lines[:2]
    assert found.records[1].path.endswith(f"{first_class.replace(' ', '_')}/{b}.mkv")
    assert found.classes[found.records[0].label] == first_class
    assert len(found.classes) == 64 and found.missing == []


@pytest.mark.parametrize("dataset_name, folder", [("ssv2", "ssv2_OTAM"),
                                                   ("ssv2-cmn", "ssv2_CMN")])
def test_ssv2_lines_map_to_root_stem_and_split_prefixed_classes(tmp_path, dataset_name, folder):
    train = (SPLITS_DIR / folder / "trainlist03.txt").read_text().split()
    val = (SPLITS_DIR / folder / "vallist03.txt").read_text().split()
    (tmp_path / f"{train[0].split('/')[1]}.webm").touch()
    (tmp_path / val[1].split("/")[1]).mkdir()  # a frame folder
    (tmp_path / f"{val[1].split('/')[1]}_other.webm").touch()
    found = find_videos(dataset_name, tmp_path, splits=("train", "val"))
    assert [r.video_id for r in found.records] == [train[0], val[1]]
    assert [r.kind for r in found.records] == ["file", "frames"]
    assert len(found.missing) == len(train) + len(val) - 2
    train_classes = {c for c in found.classes if c.startswith("train")}
    val_classes = {c for c in found.classes if c.startswith("val")}
    assert len(train_classes) == 64 and len(val_classes) == 12
    numbers = [int(c.removeprefix("train")) for c in found.classes[:64]]
    assert numbers == sorted(numbers)  # natural order: train2 before train10
    assert found.classes[found.records[0].label] == train[0].split("/")[0]


def test_ucf101_and_hmdb51_use_class_folders(tmp_path):
    line = (SPLITS_DIR / "ucf_ARN" / "testlist03.txt").read_text().split()[0]
    (tmp_path / line.split("/")[0]).mkdir()
    (tmp_path / f"{line}.avi").touch()
    found = find_videos("ucf101", tmp_path, splits=("test",), limit=5)
    assert [r.video_id for r in found.records] == [line]
    assert len(found.classes) == 21


def test_clear_errors_for_bad_input(tmp_path, dataset):
    root, split_dir = dataset
    with pytest.raises(UserError, match="--split-dir"):
        find_videos("custom", root)
    with pytest.raises(UserError, match="does not exist"):
        find_videos("ucf101", tmp_path / "nowhere")
    with pytest.raises(UserError, match="unknown split"):
        find_videos("custom", root, split_dir=split_dir, splits=("training",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="none of trainlist"):
        find_videos("custom", root, split_dir=tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "trainlist.txt").write_text("no-slash-here\n")
    with pytest.raises(UserError, match="expected '<class>/<stem>'"):
        find_videos("custom", root, split_dir=tmp_path / "bad")


def test_every_registered_dataset_has_its_vendored_lists():
    from cache.datasets import DATASETS
    from extract.datasets import SPLITS_DIR, split_list_files

    for name, spec in DATASETS.items():
        if spec.split_folder is None or not spec.videos:
            continue
        files = split_list_files(name, None)
        assert set(files) == {"train", "val", "test"}
        assert all(f.is_file() and f.parent == SPLITS_DIR / spec.split_folder
                   for f in files.values()), name
