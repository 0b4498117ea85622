"""Issue 10, security (extract part): `extract --overwrite` replaces only a cache, and an HDF5
cache another process is writing is refused before anything touches it."""

import hashlib
import shutil
import subprocess
import sys

import pytest
from reliability_helpers import extract, one_line

from cache import FeatureCache
from cache.synthetic import SynthConfig, generate_synthetic


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p).encode() + (p.read_bytes() if p.is_file() else b""))
    return h.hexdigest()


@pytest.mark.parametrize("target", ["root", "home"])
def test_overwrite_never_deletes_a_dataset_or_home_folder(tiny_dataset, weights_file, tmp_path,
                                                          target):
    shared_root, split_dir = tiny_dataset
    root = tmp_path / "dataset"  # a copy: were the bug back, it would delete the shared one
    shutil.copytree(shared_root, root)
    if target == "home":
        out = tmp_path / "home"
        (out / "Documents").mkdir(parents=True)
        (out / "Documents" / "thesis.tex").write_text("years of work")
    else:
        out = root
    before = digest(out)
    result = extract(root, split_dir, out, weights_file, tmp_path, "--overwrite")
    output = one_line(result).replace(str(out), "")
    assert "is not a feature cache" in output and "never replaced" in output
    assert "--overwrite" not in output  # the refusal does not suggest the flag
    assert digest(out) == before
    assert not (out.parent / f"{out.name}.lock").exists()  # refused before taking any lock


def test_a_cache_extract_did_not_make_needs_overwrite_and_is_then_replaced(tiny_dataset,
                                                                           weights_file,
                                                                           tmp_path):
    root, split_dir = tiny_dataset
    out = tmp_path / "synthetic.zarr"
    generate_synthetic(str(out), SynthConfig(channels=4, train_classes=2, val_classes=0,
                                             test_classes=0, videos_per_class=1),
                       progress=False)
    refused = extract(root, split_dir, out, weights_file, tmp_path)
    assert "holds a cache that extract did not make (dataset 'synthetic')" in one_line(refused)
    replaced = extract(root, split_dir, out, weights_file, tmp_path, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    with FeatureCache.open(out) as cache:
        assert cache.attrs["dataset"] == "custom" and cache.done.sum() == 3


def test_hdf5_overwrite_while_another_process_writes_is_refused_untouched(tiny_dataset,
                                                                          weights_file, tmp_path):
    root, split_dir = tiny_dataset
    out = tmp_path / "busy.h5"
    first = extract(root, split_dir, out, weights_file, tmp_path, "--backend", "hdf5")
    assert first.exit_code == 0, first.output
    before = out.read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, h5py\n"
        f"f = h5py.File({str(out)!r}, 'r+')\n"
        "print('writing', flush=True)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "writing"
        result = extract(root, split_dir, out, weights_file, tmp_path, "--backend", "hdf5",
                         "--overwrite")
    finally:
        holder.communicate("")
    output = one_line(result).replace(str(out), "")
    assert "in use by another process" in output and "--overwrite" not in output
    assert out.read_bytes() == before
