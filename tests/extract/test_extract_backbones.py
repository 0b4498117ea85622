"""Any frozen image backbone in phase one: the registry, each library's preprocessing, cache rows
equal to an independent recomputation with the library's own API (timm CNN, timm ViT, open_clip
ViT; random weights in files the tests make), the attributes, --pool-to, resume refusals, offline
errors, and train-heads / evaluate on caches of each kind.

Nothing here downloads: weights come from files written by the tests, and the pretrained paths
run with the libraries' download functions replaced by an offline stand-in.
"""

import hashlib
import json
import re

import numpy as np
import open_clip
import pytest
import timm
import timm.models._hub
import torch
from extract_testing import _random_resnet18_state, build_dataset, decode_all
from test_extract_pipeline import assert_close_fp16, run_cli, video_path
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from cache import FeatureCache, UserError
from extract.backbones import parse_backbone, plain_names
from extract.sampling import plan_views

FRAMES = 4
# 3 train, 2 val, 2 test classes of 2 short videos each: enough for 2-way 1-shot episodes
CLASSES = {"train": ["a", "b", "c"], "val": ["d", "e"], "test": ["f", "g"]}
VIDEOS = {f"{c}/v{i}": ("mp4" if i == 0 else "frames", 10 + 3 * i)
          for cs in CLASSES.values() for c in cs for i in range(2)}
SPLIT_LINES = {split: [f"{c}/v{i}" for c in cs for i in range(2)]
               for split, cs in CLASSES.items()}
IDS = [v for s in ("train", "val", "test") for v in SPLIT_LINES[s]]
# A CLIP ViT small enough for a test: 2 blocks of width 64, patch 16 at 64 px (a 4 x 4 grid).
TINY_CLIP = "ViT-Tiny-16-test"
TINY_CLIP_CFG = {"embed_dim": 32,
                 "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32,
                                "patch_size": 16},
                 "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2,
                              "layers": 1}}


def seeded(seed, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    base = tmp_path_factory.mktemp("bb_videos")
    build_dataset(base / "root", base / "splits", videos=VIDEOS, split_lines=SPLIT_LINES)
    return base / "root", base / "splits"


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Random weights as a user's files: timm resnet18 (BN calibrated, as conftest's torchvision
    one: same keys), timm ViT-Tiny at 64 px, and the tiny open_clip model (registered by name)."""
    base = tmp_path_factory.mktemp("bb_weights")
    torch.save(_random_resnet18_state(3), base / "timm_resnet18.pth")
    vit = seeded(4, lambda: timm.create_model("vit_tiny_patch16_224", img_size=64))
    torch.save(vit.state_dict(), base / "vit_tiny.pth")
    (base / "configs").mkdir()
    (base / "configs" / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(base / "configs")
    clip = seeded(5, lambda: open_clip.create_model(TINY_CLIP))
    torch.save(clip.state_dict(), base / "clip_tiny.pth")
    return {"timm-cnn": base / "timm_resnet18.pth", "timm-vit": base / "vit_tiny.pth",
            "clip-vit": base / "clip_tiny.pth"}


# kind -> (--backbone, --image-size): every map is 4 x 4, as TTM and SC need
KINDS = {"timm-cnn": ("timm:resnet18", 128), "timm-vit": ("timm:vit_tiny_patch16_224", 64),
         "clip-vit": (f"clip:{TINY_CLIP}", 64)}


def extract(videos, work, backbone, weights, image_size, *extra):
    root, split_dir = videos
    args = ["extract", "--dataset", "custom", "--root", str(root), "--split-dir", str(split_dir),
            "--out", str(work / "feats.zarr"), "--backbone", backbone, "--weights", str(weights),
            "--image-size", str(image_size), "--frames", str(FRAMES), "--device", "cpu",
            "--workers", "0", *extra]
    return run_cli(args, work)


@pytest.fixture(scope="module")
def caches(videos, weight_files, tmp_path_factory):
    """One cache per kind, extracted with the backbone's default resize for the image size."""
    out = {}
    for kind, (backbone, size) in KINDS.items():
        work = tmp_path_factory.mktemp(kind)
        result = extract(videos, work, backbone, weight_files[kind], size)
        assert result.exit_code == 0, result.output
        out[kind] = work
    return out


# ------------------------------------------------------------------------------ the reference
def reference_input(path, preprocessing, image_size):
    """The test's own preprocessing: decode all frames, take the centre TSN frames, resize with
    the library's filter to image size / crop fraction, centre-crop, normalise."""
    frames = decode_all(path)
    resize = max(image_size, round(image_size / preprocessing["crop_pct"]))
    (plan,) = plan_views(len(frames), frames=FRAMES, video_id="x", resize=resize,
                         image_size=image_size)
    x = torch.from_numpy(frames[list(plan.indices)]).permute(0, 3, 1, 2)  # (T, 3, H, W)
    x = tvf.resize(x, [resize, resize], interpolation=InterpolationMode(preprocessing["interp"]),
                   antialias=True)
    x = x[:, :, plan.top:plan.top + image_size, plan.left:plan.left + image_size]
    return tvf.normalize(x.float() / 255, preprocessing["mean"], preprocessing["std"])


def library_preprocessing(kind, backbone):
    """mean / std / filter / crop fraction read straight from the library's config."""
    if kind.startswith("timm"):
        cfg = timm.data.resolve_model_data_config(timm.create_model(backbone[5:]))
        return {"mean": list(cfg["mean"]), "std": list(cfg["std"]),
                "interp": cfg["interpolation"], "crop_pct": cfg["crop_pct"]}
    return {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
            "interp": "bicubic", "crop_pct": 1.0}  # open_clip's eval transform without a tag


def library_net(kind, weights):
    """The library's own model, with the file's tensors loaded strictly by torch."""
    if kind == "timm-cnn":
        net = timm.create_model("resnet18")
    elif kind == "timm-vit":
        net = timm.create_model("vit_tiny_patch16_224", img_size=64)
    else:
        net = open_clip.create_model(TINY_CLIP)
    net.load_state_dict(torch.load(weights, weights_only=True))
    return net.eval()


def library_maps(kind, net, x):
    """The library's own forward: timm forward_features (ViT prefix tokens dropped by hand), or
    open_clip's visual tower with output_tokens (its ln_post'd, unprojected patch tokens)."""
    with torch.no_grad():
        if kind == "timm-cnn":
            return net.forward_features(x)  # (T, C, h, w)
        if kind == "timm-vit":
            tokens = net.forward_features(x)[:, net.num_prefix_tokens:]  # (T, 16, C)
        else:
            net.visual.output_tokens = True
            _, tokens = net.visual(x)  # (T, 16, C)
    return tokens.reshape(len(x), 4, 4, -1).permute(0, 3, 1, 2)  # (T, C, 4, 4)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.slow
def test_rows_equal_the_library_forward_on_the_same_frames(caches, videos, weight_files, kind):
    backbone, size = KINDS[kind]
    prep = library_preprocessing(kind, backbone)
    net = library_net(kind, weight_files[kind])
    with FeatureCache.open(caches[kind] / "feats.zarr") as cache:
        assert list(cache.video_ids) == IDS and cache.done.all()
        for row, video_id in enumerate(IDS):
            x = reference_input(video_path(videos[0], video_id), prep, size)
            expected = library_maps(kind, net, x).permute(1, 0, 2, 3)  # (C, T, h, w)
            assert_close_fp16(cache.read_row(row), expected.numpy())


EXPECTED = {  # kind -> (C, grid, library, mean, interpolation, resize at the test's image size)
    "timm-cnn": (512, [4, 4], "timm", [0.485, 0.456, 0.406], "bicubic", 135),
    "timm-vit": (192, [4, 4], "timm", [0.5, 0.5, 0.5], "bicubic", 71),
    "clip-vit": (64, [4, 4], "open_clip", [0.48145466, 0.4578275, 0.40821073], "bicubic", 64),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.slow
def test_attributes_record_backbone_weights_preprocessing_grid_and_pooling(caches, weight_files,
                                                                          kind):
    channels, grid, library, mean, interpolation, resize = EXPECTED[kind]
    with FeatureCache.open(caches[kind] / "feats.zarr") as cache:
        attrs = cache.attrs
        assert cache.shape == (channels, FRAMES, *grid)
    assert attrs["backbone"] == KINDS[kind][0]
    assert attrs["backbone_info"]["library"] == library
    assert attrs["backbone_info"]["channels"] == channels and attrs["backbone_info"]["grid"] == grid
    assert "before the projection" in attrs["backbone_info"]["feature"] or library == "timm"
    assert attrs["weights"]["source"] == "file"
    assert attrs["weights"]["sha256"] == hashlib.sha256(
        weight_files[kind].read_bytes()).hexdigest()
    assert len(attrs["weights_state_sha256"]) == 64
    assert attrs["mean"] == pytest.approx(mean) and attrs["interpolation"] == interpolation
    assert attrs["preprocessing"]["interpolation"] == interpolation
    assert attrs["preprocessing"]["source"].startswith(library)
    assert attrs["image_size"] == KINDS[kind][1] and attrs["resize"] == resize
    assert attrs["extract_config"]["resize"] == resize
    assert attrs["grid"] == grid and attrs["pool_to"] is None


@pytest.mark.slow
def test_resume_refuses_another_backbone_and_another_pooling(caches, videos, weight_files):
    work = caches["timm-vit"]
    other = extract(videos, work, "timm:resnet18", weight_files["timm-cnn"], 64)
    assert other.exit_code != 0
    assert "backbone: cache 'timm:vit_tiny_patch16_224', this run 'timm:resnet18'" in other.output
    assert "\n" not in other.output.strip() and "Traceback" not in other.output
    pooled = extract(videos, work, *KINDS["timm-vit"][:1], weight_files["timm-vit"], 64,
                     "--pool-to", "2")
    assert pooled.exit_code != 0 and "pool_to: cache None, this run 2" in pooled.output
    again = extract(videos, work, KINDS["timm-vit"][0], weight_files["timm-vit"], 64)
    assert again.exit_code == 0 and f"{len(IDS)} already done" in again.output


@pytest.mark.slow
def test_pool_to_averages_the_map_and_is_recorded(caches, videos, weight_files, tmp_path):
    result = extract(videos, tmp_path, KINDS["clip-vit"][0], weight_files["clip-vit"], 64,
                     "--pool-to", "2", "--dtype", "float32", "--splits", "test")
    assert result.exit_code == 0, result.output
    with FeatureCache.open(tmp_path / "feats.zarr") as pooled, \
            FeatureCache.open(caches["clip-vit"] / "feats.zarr") as full:
        assert pooled.shape == (64, FRAMES, 2, 2)
        assert pooled.attrs["pool_to"] == 2 and pooled.attrs["grid"] == [4, 4]
        first_test = IDS.index(SPLIT_LINES["test"][0])
        whole = torch.from_numpy(full.read_row(first_test).astype(np.float32))  # (C, T, 4, 4)
        expected = whole.reshape(64, FRAMES, 2, 2, 2, 2).mean(dim=(3, 5))  # (C, T, 2, 2)
        assert_close_fp16(pooled.read_row(0), expected.numpy())
    (tmp_path / "big").mkdir()
    too_big = extract(videos, tmp_path / "big", KINDS["clip-vit"][0], weight_files["clip-vit"],
                      64, "--pool-to", "5")
    assert too_big.exit_code != 0 and "--pool-to 5 is larger than" in too_big.output


# ------------------------------------------------------------------------------ the registry
def test_registry_names_prefixes_and_one_line_errors():
    assert parse_backbone("resnet152").library == "torchvision"
    assert parse_backbone("resnet101").family.shape(parse_backbone("resnet101"), 224) == \
        (2048, 7, 7)
    spec = parse_backbone("clip:ViT-B-16/openai")
    assert (spec.library, spec.arch, spec.tag) == ("open_clip", "ViT-B-16", "openai")
    assert parse_backbone("timm:vit_small_patch16_224.augreg_in21k").arch == \
        "vit_small_patch16_224.augreg_in21k"
    for bad, message in [("vgg16", "use one of resnet18"), ("timm:no_such_net", "timm has no"),
                         ("timm:resnet18.no_such_tag", "Invalid pretrained tag"),
                         ("clip:ViT-B-16/no_tag", "tags: openai"), ("clip:NoNet", "no model")]:
        with pytest.raises(UserError, match=message) as caught:
            parse_backbone(bad)
        assert "\n" not in caught.value.message


def test_cli_validates_backbone_and_lists_the_forms(tmp_path):
    result = run_cli(["extract", "--dataset", "ucf101", "--backbone", "vgg16"], tmp_path)
    assert result.exit_code == 2 and "timm:<name>[.<tag>], clip:<arch>/<pretrained-tag>" in \
        result.output
    help_text = " ".join(run_cli(["extract", "--help"], tmp_path).output.split())
    for name in [*plain_names().split(", "), "timm:...", "clip:...", "--pool-to"]:
        assert name in help_text


def test_preprocessing_comes_from_each_library():
    resnet = parse_backbone("resnet50").preprocessing()
    assert (resnet.input_size, resnet.resize_for(224), resnet.interpolation) == \
        (224, 256, "bilinear")
    assert resnet.mean == pytest.approx((0.485, 0.456, 0.406))
    vit = parse_backbone("timm:vit_small_patch16_224").preprocessing()
    assert vit.mean == (0.5, 0.5, 0.5) and vit.interpolation == "bicubic"
    assert vit.resize_for(224) == 249  # timm's crop_pct 0.9
    clip = parse_backbone("clip:ViT-B-16/openai").preprocessing()
    assert clip.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert (clip.input_size, clip.resize_for(224), clip.interpolation) == (224, 224, "bicubic")
    siglip = parse_backbone("clip:ViT-B-16-SigLIP/webli").preprocessing()
    assert siglip.mean == (0.5, 0.5, 0.5)  # the tag's config, not CLIP's constants


# ------------------------------------------------------------------------------ offline
def offline(*args, **kwargs):
    raise OSError("Temporary failure in name resolution")


def test_pretrained_offline_and_uncached_says_where_to_put_the_file(monkeypatch):
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", offline)
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", offline)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_url", offline)
    for name in ("timm:resnet18", "clip:ViT-B-16/openai"):
        with pytest.raises(UserError) as caught:
            parse_backbone(name).load("pretrained", 0, 224)
        message = caught.value.message
        assert "\n" not in message and "Temporary failure" in message
        assert "pass --weights /path/to/the/file" in message and "Hugging Face hub" in message
    with pytest.raises(UserError, match="needs a tag: clip:ViT-B-16/<tag>"):
        parse_backbone("clip:ViT-B-16").load("pretrained", 0, 224)


def test_unfitting_weight_files_give_one_line_errors(weight_files, tmp_path):
    """timm loads non-strictly without a classifier; a foreign or partial file must still fail."""
    partial = tmp_path / "partial.pth"
    state = torch.load(weight_files["timm-vit"], weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("blocks.11.")}, partial)
    for name, path, message in [
            ("timm:vit_tiny_patch16_224", weight_files["timm-cnn"], "do not fit timm"),
            ("timm:vit_tiny_patch16_224", partial, "random init, e.g. ['blocks.11"),
            (f"clip:{TINY_CLIP}", weight_files["timm-cnn"], "could not be loaded into")]:
        with pytest.raises(UserError, match=re.escape(message)) as caught:
            parse_backbone(name).load(str(path), 0, 64)
        assert "\n" not in caught.value.message


def test_random_init_is_seeded(weight_files):
    spec = parse_backbone(f"clip:{TINY_CLIP}")
    hashes = [spec.load("none", seed, 64)[1].state_sha256 for seed in (0, 0, 1)]
    assert hashes[0] == hashes[1] != hashes[2]


# ------------------------------------------------------------------------------ phase two
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.slow
def test_train_heads_and_evaluate_run_on_a_cache_of_each_kind(caches, kind):
    work = caches[kind]
    cache = str(work / "feats.zarr")
    train = run_cli(["train-heads", "--cache", cache, "--head", "ta2n", "--way", "2",
                     "--shots", "1", "--queries", "1", "--epochs", "1",
                     "--episodes-per-epoch", "2", "--tasks-per-batch", "2", "--val-every", "1",
                     "--val-episodes", "2", "--seed", "0", "--device", "cpu",
                     "--out", str(work / "run")], work)
    assert train.exit_code == 0, train.output
    report = work / "eval.json"
    evaluate = run_cli(["evaluate", "--checkpoint", str(work / "run" / "best.pt"), "--way", "2",
                        "--shots", "1", "--queries", "1", "--episodes", "4", "--seed", "0",
                        "--report", str(report), "--device", "cpu"], work)
    assert evaluate.exit_code == 0, evaluate.output
    result = json.loads(report.read_text())
    assert result["episodes"] == 4 and 0.0 <= result["accuracy"] <= 100.0  # percent
    with FeatureCache.open(cache) as opened:
        assert opened.shape != (2048, 8, 7, 7)
