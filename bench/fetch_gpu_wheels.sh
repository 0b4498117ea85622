#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels the GPU machine lacks for bench/gpu_all.sh: Python
# 3.12, manylinux x86_64. That machine already has torch, torchvision, numpy, h5py, click, joblib,
# matplotlib, tqdm, scipy, scikit-learn, timm, safetensors, filelock (see the device tool's
# KINDS.md); it lacks zarr and its codecs, decord and PyAV. Extra `name==version` lines can be
# listed in bench/gpu_wheels.txt for runs that need them (e.g. open_clip for clip: backbones;
# PyNvVideoCodec, 27 MB, for gpu_all.sh's `--decoder gpu` part: with the base list that is about
# 77 MB, over the 64 MiB one device call carries; without it that part fails in its row with
# extract's one-line refusal and the other parts still run);
# gpu_all.sh's other parts need only the list below (about 50 MB).
#   bash bench/fetch_gpu_wheels.sh            # the base list
#   bash bench/fetch_gpu_wheels.sh --extra    # plus bench/gpu_wheels.txt
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
wheels="zarr==3.1.6 numcodecs==0.17.1 donfig==0.8.1.post1 google-crc32c==1.9.0 decord==0.6.0 av==19.0.2"
if [ "${1:-}" = "--extra" ] && [ -f bench/gpu_wheels.txt ]; then
  wheels="$wheels $(grep -v '^#' bench/gpu_wheels.txt | tr '\n' ' ')"
fi
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 \
  -d .whl $wheels
du -sh .whl
