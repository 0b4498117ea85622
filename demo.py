"""`make demo` (`python cli.py demo`): the whole pipeline, end to end, on the built-in toy dataset.

It runs the very commands a user types and times them (each as its own process by default;
`python cli.py demo` runs them inside its own process, see ``run_demo``):

    python cli.py toy-data        --out data/demo                       the videos and split lists
    python cli.py adapt-backbone  --dataset custom ... --out runs/demo/backbone.pt   (base classes)
    python cli.py extract         --dataset custom --weights runs/demo/backbone.pt ...
    python cli.py train-heads     --cache caches/demo.zarr --head ta2n ... --out runs/demo/ta2n
    python cli.py evaluate        --checkpoint runs/demo/ta2n/best.pt --save-episodes ...
    python cli.py evaluate        --head protonet --episodes-from ...   the same test episodes
    python cli.py visualize       --checkpoint runs/demo/ta2n/best.pt --episodes-from ...
    python cli.py classify        --checkpoint runs/demo/ta2n/best.pt --support ... --query ...
    python cli.py classify        --head protonet --cache caches/demo.zarr ...  the same clips

(the two classify steps label clips of the test classes that are not in the support set, as a
person labels their own clips: ``prepare_clips`` links K clips per class into
runs/demo/my-clips/support/<class>/ and the next ones into runs/demo/my-clips/query/<class>/),
then prints a summary (accuracy +- CI per head, the margin, where the backbone's weights came
from, wall and CPU time per phase) and writes runs/demo/report.md. The backbone is adapted on the
toy dataset's train classes, starting from torchvision's ImageNet weights when its cache already
holds them (nothing is downloaded), else from random weights. Everything is seeded: the same
seed and starting weights give the same videos, backbone, features, episodes and numbers.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torchvision

from cache import UserError
from cache.atomic import write_text
from cache.options import option

CLI = Path(__file__).resolve().parent / "cli.py"


@dataclass
class DemoConfig:
    """The demo's settings: a small, fast version of the paper's protocol.

    Every choice below was made on the val split (its classes, its episodes) or on train-heads'
    own validation, never on the test episodes the summary reports. Measured on this project's
    2-core CPU (shared with other jobs), 300 val episodes unless said, on the toy videos as they
    were encoded before toy-data became byte-stable (the test figures moved by about a point):

    - nine poses in the toy data: ProtoNet 38.9 %, TA2N 58.5 % after 160 training episodes; its
      own validation (100 episodes) read 56.2 % after 80 and 56.8 % after 160, so the demo trains
      80 (4 epochs of 20, validated after epochs 2 and 4), which keeps it near 3 minutes;
    - six poses (the dataset before): ProtoNet 45.6 %, TA2N 55.5 % (150 val episodes, 120
      training episodes); with the fast recipe's default dropout 0.5 TA2N fell to 46.9 %, so
      dropout is 0; with an earlier backbone of the same recipe, the SGD schedule this demo used
      before (lr 0.002, best of 0.001 / 0.002 / 0.004 / 0.01) reached 48.5 % against ProtoNet's
      43.4 %;
    - stronger temporal misalignment (windows 0.3-0.75 of the video, evolution 2.5; six poses)
      lowered both heads (ProtoNet 32.3 %, TA2N 40.9 %); 40 train classes of 5 videos (six poses)
      left the 3-epoch adaptation at chance (ProtoNet 33.1 %, TA2N 41.0 %).

    TA2N needs maps of at least 4 x 4, which the 112 px crop gives (TTM and SC refuse 3 x 3); its
    spatial coordination costs most of a training step there (0.5 s of the 0.6 s of a 5-way
    1-shot episode with 2 queries per class).

    Args:
        data, cache, run: where the videos, the feature cache and the run outputs go.
        workdir: the folder the commands run in (relative paths are relative to it).
        weights: where adaptation starts: "auto" (ImageNet when torchvision's cache has it,
            else random), "imagenet", "none", or a weights file.
        backbone, frames, image_size, resize: extraction (resize 128 / crop 112 gives 4 x 4 maps).
        adapt_epochs, adapt_frames, adapt_batch, adapt_lr: the base-class adaptation (AdamW; a
            gentle lr: from random weights, 3e-4 keeps what the random features carry, 2e-3
            scrambled them within the demo's few steps).
        workers: decode processes of adapt-backbone and extract (None: their default; 0
            decodes in the command's own process, whose CPU time is then all counted).
        train_classes, val_classes, test_classes, videos_per_class, video_frames, video_size:
            the toy dataset.
        way, shots, train_queries: the episodes.
        epochs, episodes_per_epoch, patience, dropout, val_every, val_episodes: the short
            training schedule of the TA2N head, with train-heads' default fast recipe (Adam, lr
            1e-3, cosine, one episode per step) and no early stopping (a fixed budget keeps the
            demo's time predictable); the best checkpoint of the validations is kept.
        eval_episodes: test episodes both heads are scored on.
        classify_classes, classify_queries, classify_figures: classify labels
            ``classify_queries`` clips of each of the first ``classify_classes`` test classes,
            with ``shots`` support clips each, and draws the first ``classify_figures`` queries'
            figures.
        vis_episodes, vis_pairs: what `visualize` draws.
        seed: seeds the videos, the adaptation, the training, the episodes.
        device: auto, cpu or cuda.
    """

    data: str = "data/demo"
    cache: str = "caches/demo.zarr"
    run: str = "runs/demo"
    workdir: str = "."
    weights: str = option("auto", help="Where the backbone's adaptation starts: auto (ImageNet "
                          "if torchvision's cache has it, no download; else random), imagenet, "
                          "none, a weights file.")
    backbone: str = option("resnet18", choices=("resnet18", "resnet34", "resnet50"))
    frames: int = 8
    image_size: int = 112
    resize: int = 128
    adapt_epochs: int = option(3, help="Epochs of the backbone's adaptation on the train classes.")
    adapt_frames: int = 2
    adapt_batch: int = 8
    adapt_lr: float = 3e-4
    workers: int | None = 0
    train_classes: int = 16
    val_classes: int = 6
    test_classes: int = 10
    videos_per_class: int = 8
    video_frames: int = 24
    video_size: int = 112
    way: int = 5
    shots: int = 1
    train_queries: int = 2
    epochs: int = option(4, help="TA2N training epochs.")
    episodes_per_epoch: int = option(20)
    patience: int = 0
    dropout: float = 0.0
    val_every: int = 2
    val_episodes: int = 100
    eval_episodes: int = option(300, help="Test episodes both heads are scored on.")
    classify_classes: int = 10
    classify_queries: int = 3
    classify_figures: int = 3
    vis_episodes: int = 1
    vis_pairs: str = "true"
    seed: int = option(0)
    device: str = "auto"

    @property
    def backbone_file(self) -> str:
        return str(Path(self.run) / "backbone.pt")


def cached_imagenet_weights(arch: str) -> str | None:
    """The file of torchvision's ImageNet weights for ``arch`` if its cache holds it (no
    download): <torch hub dir>/checkpoints/<file name of the weights URL>."""
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    return str(path) if path.is_file() else None


def choose_weights(cfg: DemoConfig) -> tuple[str, str | None]:
    """(the --weights adaptation starts from, a notice to print or None)."""
    if cfg.weights != "auto":
        return cfg.weights, None
    if cached_imagenet_weights(cfg.backbone):
        return "imagenet", None
    url = torchvision.models.get_model_weights(cfg.backbone).IMAGENET1K_V1.url
    return "none", (
        f"NOTICE: torchvision's cache has no ImageNet weights for {cfg.backbone} "
        f"({Path(torch.hub.get_dir()) / 'checkpoints' / os.path.basename(url)}), so the "
        "backbone is adapted on the toy dataset's train classes starting from RANDOM weights. "
        "That is enough for these simple videos; to start from ImageNet instead, fetch the "
        f"weights once (python -c \"import torchvision; torchvision.models.{cfg.backbone}"
        f"(weights='IMAGENET1K_V1')\", or download {url} into that folder).")


def commands(cfg: DemoConfig, weights: str) -> list[tuple[str, list[str]]]:
    """(phase name, cli.py arguments) of every step, in order."""
    run = Path(cfg.run)
    checkpoint = str(run / "ta2n" / "best.pt")
    episodes = str(run / "test-episodes.json")
    dataset = ["--dataset", "custom", "--root", f"{cfg.data}/videos",
               "--split-dir", f"{cfg.data}/splits"]
    decode = [] if cfg.workers is None else ["--workers", cfg.workers]
    toy = ["toy-data", "--out", cfg.data, "--train-classes", cfg.train_classes,
           "--val-classes", cfg.val_classes, "--test-classes", cfg.test_classes,
           "--videos-per-class", cfg.videos_per_class, "--frames", cfg.video_frames,
           "--size", cfg.video_size, "--seed", cfg.seed]
    adapt = ["adapt-backbone", *dataset, "--backbone", cfg.backbone, "--weights", weights,
             "--frames", cfg.adapt_frames, "--image-size", cfg.image_size,
             "--resize", cfg.resize, "--epochs", cfg.adapt_epochs,
             "--batch-size", cfg.adapt_batch, "--optimizer", "adamw", "--lr", cfg.adapt_lr,
             "--seed", cfg.seed, *decode, "--device", cfg.device, "--out", cfg.backbone_file,
             "--overwrite"]
    extract = ["extract", *dataset, "--out", cfg.cache, "--backbone", cfg.backbone,
               "--weights", cfg.backbone_file, "--frames", cfg.frames,
               "--image-size", cfg.image_size, "--resize", cfg.resize, "--seed", cfg.seed,
               *decode, "--device", cfg.device, "--overwrite"]
    train = ["train-heads", "--cache", cfg.cache, "--head", "ta2n", "--way", cfg.way,
             "--shots", cfg.shots, "--queries", cfg.train_queries, "--epochs", cfg.epochs,
             "--episodes-per-epoch", cfg.episodes_per_epoch,
             "--patience", cfg.patience,
             "--dropout", cfg.dropout, "--val-every", cfg.val_every,
             "--val-episodes", cfg.val_episodes, "--seed", cfg.seed, "--device", cfg.device,
             "--out", str(run / "ta2n")]
    eval_ta2n = ["evaluate", "--checkpoint", checkpoint, "--way", cfg.way,
                 "--episodes", cfg.eval_episodes, "--seed", cfg.seed,
                 "--save-episodes", episodes, "--report", str(run / "eval-ta2n.json"),
                 "--device", cfg.device]
    eval_proto = ["evaluate", "--head", "protonet", "--cache", cfg.cache,
                  "--episodes-from", episodes, "--report", str(run / "eval-protonet.json"),
                  "--device", cfg.device]
    visualize = ["visualize", "--checkpoint", checkpoint, "--episodes-from", episodes,
                 "--episodes", cfg.vis_episodes, "--pairs", cfg.vis_pairs,
                 "--out", str(run / "figures"), "--device", cfg.device]
    clips = ["--support", str(run / "my-clips" / "support"),
             "--query", str(run / "my-clips" / "query"),
             "--features", str(run / "clip-features"), "--device", cfg.device]
    classify_ta2n = ["classify", "--checkpoint", checkpoint, *clips,
                     "--out", str(run / "predictions.csv"),
                     "--json", str(run / "classify-ta2n.json"),
                     "--figures", str(run / "classify-figures"),
                     "--max-figures", cfg.classify_figures]
    classify_proto = ["classify", "--head", "protonet", "--cache", cfg.cache, *clips,
                      "--out", str(run / "predictions-protonet.csv"),
                      "--json", str(run / "classify-protonet.json")]
    steps = [("toy-data", toy), ("adapt-backbone", adapt), ("extract", extract),
             ("train-heads", train), ("evaluate ta2n", eval_ta2n),
             ("evaluate protonet", eval_proto), ("visualize", visualize),
             ("classify ta2n", classify_ta2n), ("classify protonet", classify_proto)]
    return [(name, [str(a) for a in args]) for name, args in steps]


def shown(args: list[str]) -> str:
    """The command as a user would type it."""
    return "python cli.py " + shlex.join(args)


def _clear_run(cfg: DemoConfig) -> None:
    """Remove what an earlier demo left in the run folder (only the demo's own outputs;
    adapt-backbone --overwrite replaces its own files)."""
    run = Path(cfg.workdir) / cfg.run
    for name in ("ta2n", "figures", "my-clips", "clip-features", "classify-figures"):
        shutil.rmtree(run / name, ignore_errors=True)
    for name in ("test-episodes.json", "eval-ta2n.json", "eval-protonet.json", "report.md",
                 "predictions.csv", "predictions-protonet.csv", "classify-ta2n.json",
                 "classify-protonet.json"):
        (run / name).unlink(missing_ok=True)


def prepare_clips(cfg: DemoConfig) -> dict[str, list[str]]:
    """Link clips of the test classes into a person's layout: the first ``shots`` videos of
    each of the first ``classify_classes`` test classes into my-clips/support/<class>/, the next
    ``classify_queries`` into my-clips/query/<class>/ (so their labels are known). Returns
    {class: its query videos}."""
    here = Path(cfg.workdir)
    by_class: dict[str, list[str]] = {}
    for line in (here / cfg.data / "splits" / "testlist.txt").read_text().split():
        by_class.setdefault(line.split("/")[0], []).append(line)
    clips = here / cfg.run / "my-clips"
    queries = {}
    for name in list(by_class)[:cfg.classify_classes]:
        lines = sorted(by_class[name])
        chosen = {"support": lines[:cfg.shots],
                  "query": lines[cfg.shots:cfg.shots + cfg.classify_queries]}
        for part, picked in chosen.items():
            (clips / part / name).mkdir(parents=True, exist_ok=True)
            for line in picked:
                video = (here / cfg.data / "videos" / f"{line}.mp4").resolve()
                (clips / part / name / video.name).symlink_to(video)
        queries[name] = chosen["query"]
    return queries


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished child processes so far."""
    own, children = (resource.getrusage(who) for who in
                     (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_in_subprocess(args: list[str], workdir: str, quiet: bool) -> tuple[int, str]:
    """Run ``python cli.py ARGS`` as its own process in ``workdir``: (exit status, its output
    when ``quiet``, else "")."""
    # the command (and its decode workers) import this very code, wherever it runs
    path = os.pathsep.join(p for p in (str(CLI.parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see run_demo
    result = subprocess.run([sys.executable, str(CLI), *args], cwd=workdir, env=env,
                            capture_output=quiet, text=True)
    return result.returncode, (result.stdout or "") + (result.stderr or "")


def run_demo(cfg: DemoConfig, *, echo=print, quiet: bool = False, runner=None) -> dict:
    """Run every phase, time it, summarise, write the report.

    Args:
        runner: ``runner(args, workdir, quiet) -> (exit status, output)`` runs one
            ``python cli.py ARGS``; the default, ``run_in_subprocess``, starts a process per
            phase. `python cli.py demo` passes one that runs the commands inside its own process
            (cli.py's ``run_in_process``): every process start imports torch again, a few CPU
            seconds per phase the 4-minute budget of the demo cannot spare.
        quiet: hide the commands' own output (tests); a failing command's output is shown.
    """
    runner = runner or run_in_subprocess
    start = time.perf_counter()
    weights, notice = choose_weights(cfg)
    if notice:
        echo(notice)
    _clear_run(cfg)
    phases = []
    for name, args in commands(cfg, weights):
        if name == "classify ta2n":  # a person's folders of clips, made of unseen test videos
            prepare_clips(cfg)
        echo(f"\n==> [{name}] {shown(args)}")
        tick, cpu = time.perf_counter(), _cpu_seconds()
        status, output = runner(args, cfg.workdir, quiet)
        seconds, cpu = time.perf_counter() - tick, _cpu_seconds() - cpu
        if status != 0:
            if quiet:
                echo(output)
            raise UserError(f"demo: the {name} step failed (exit {status}): {shown(args)}")
        phases.append({"name": name, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
                       "command": shown(args)})
        echo(f"==> [{name}] {seconds:.1f} s wall, {cpu:.1f} s CPU")
    summary = _collect(cfg, weights, notice, phases, time.perf_counter() - start)
    summary["report"] = str(_write_report(cfg, summary))
    return summary


def _collect(cfg: DemoConfig, weights: str, notice: str | None, phases: list[dict],
             total: float) -> dict:
    """Read the evaluation reports, the backbone's provenance and the figure index."""
    run = Path(cfg.workdir) / cfg.run
    results = []
    for head in ("ta2n", "protonet"):
        path = run / f"eval-{head}.json"
        report = json.loads(path.read_text())
        results.append({"head": head, "accuracy": report["accuracy"], "ci95": report["ci95"],
                        "episodes": report["episodes"], "report": str(path),
                        "summary": report["summary"]})
    index = json.loads((run / "figures" / "index.json").read_text())
    here = Path(cfg.workdir)  # the commands wrote paths relative to their working folder

    def located(p: str | None) -> str | None:
        return None if p is None else str(p if Path(p).is_absolute() else here / p)

    index["curves"] = located(index.get("curves"))
    for record in index.get("figures", []):
        record["path"] = located(record["path"])
    ta2n, proto = results
    classified = {}
    for head in ("ta2n", "protonet"):
        report = json.loads((run / f"classify-{head}.json").read_text())
        classified[head] = {"accuracy": report["accuracy"]["accuracy"],
                            "queries": report["accuracy"]["queries"],
                            "classes": len(report["classes"]), "out": located(report["out"]),
                            "figures": [{**f, "path": located(f["path"])}
                                        for f in report["figures"]]}
    return {"config": asdict(cfg), "weights": weights, "notice": notice, "results": results,
            "classify": classified,
            "margin": margin(ta2n, proto, 100 / cfg.way),
            "backbone": backbone_record(here / f"{cfg.backbone_file}.json"),
            "phases": phases, "total_seconds": round(total, 2),
            "total_cpu_seconds": round(sum(p["cpu_seconds"] for p in phases), 2),
            "figures": index, "figures_dir": str(run / "figures")}


def margin(ta2n: dict, proto: dict, chance: float) -> dict:
    """TA2N's lead over ProtoNet, whether their 95% intervals are disjoint, chance level."""
    lead = ta2n["accuracy"] - proto["accuracy"]
    disjoint = ta2n["accuracy"] - ta2n["ci95"] > proto["accuracy"] + proto["ci95"]
    above = min(ta2n["accuracy"] - ta2n["ci95"], proto["accuracy"] - proto["ci95"]) > chance
    return {"points": round(lead, 2), "disjoint": bool(disjoint), "chance": round(chance, 2),
            "both_above_chance": bool(above)}


def backbone_record(sidecar: Path) -> dict:
    """What the demo says about its backbone, from adapt-backbone's sidecar."""
    meta = json.loads(sidecar.read_text())
    init = meta["init_weights"]
    start = {"none": "random weights", "imagenet": "ImageNet weights"}.get(
        init["source"], init["description"])
    return {"name": meta["backbone"]["name"], "start": start,
            "base_classes": len(meta["base_classes"]), "videos": len(meta["videos"]),
            "epochs": meta["epochs"], "held_out_accuracy": meta["held_out_accuracy"],
            "file": str(sidecar.with_suffix("")), "sha256": meta["weights_sha256"]}


def describe_backbone(record: dict) -> str:
    """One sentence: the backbone and where its weights came from."""
    held = record["held_out_accuracy"]
    return (f"{record['name']} adapted from {record['start']} on the {record['base_classes']} "
            f"train (base) classes ({record['videos']} videos, {record['epochs']} epochs"
            + (f", {held:.1f} % on held-out train videos" if held is not None else "")
            + f"), weights {record['file']} (sha256 {record['sha256'][:12]})")


def _write_report(cfg: DemoConfig, summary: dict) -> Path:
    run = Path(cfg.workdir) / cfg.run
    lead = summary["margin"]
    intro = [
        f"The built-in toy dataset ({cfg.train_classes} train / {cfg.val_classes} val / "
        f"{cfg.test_classes} test classes, {cfg.videos_per_class} videos each: an actor takes "
        "three poses - shapes in their own colours - in a class-specific order; every video is "
        "misaligned in time window, speed and position), T = "
        f"{cfg.frames}, {cfg.image_size} px crops, {cfg.way}-way {cfg.shots}-shot, seed "
        f"{cfg.seed}.",
        "",
        f"Backbone: {describe_backbone(summary['backbone'])}.",
        "",
        f"TA2N was trained for {cfg.epochs} epochs of {cfg.episodes_per_epoch} episodes (a "
        "demo-length schedule, far shorter than the paper's); both heads are scored on the same "
        f"{cfg.eval_episodes} test episodes: TA2N leads ProtoNet by {lead['points']:.1f} points"
        f" ({'disjoint' if lead['disjoint'] else 'overlapping'} 95% intervals; chance is "
        f"{lead['chance']:.0f} %, {'both' if lead['both_above_chance'] else 'not both'} "
        "intervals lie above it).",
    ]
    notes = [summary["notice"]] if summary["notice"] else []
    return write_report(run / "report.md", title="TA2N demo", intro=intro,
                        results=summary["results"], phases=summary["phases"],
                        figures={"curves": summary["figures"].get("curves"),
                                 "pairs": summary["figures"].get("figures")},
                        notes=notes, sections=classify_section(cfg, summary, run))


def classify_section(cfg: DemoConfig, summary: dict, run: Path) -> list[str]:
    """report.md's part on `classify`: both heads on the same clips, a few queries' figures."""
    ta2n, proto = summary["classify"]["ta2n"], summary["classify"]["protonet"]

    def rel(p: str) -> str:
        return os.path.relpath(p, run)

    lines = ["## Your own clips: `classify`", "",
             f"`classify` labelled {ta2n['queries']} clips of {ta2n['classes']} test classes "
             f"that are not in its support set ({cfg.shots} support clip(s) per class, linked "
             f"into `{cfg.run}/my-clips/` as a person would arrange their own), decoding each "
             "clip once with the cache's backbone recipe (see docs/own-videos.md); chance is "
             f"{100 / ta2n['classes']:.0f} %.", "",
             "| head | accuracy (%) | predictions |", "|---|---|---|",
             f"| ta2n | {ta2n['accuracy']:.1f} | [{Path(ta2n['out']).name}]({rel(ta2n['out'])}) |",
             f"| protonet | {proto['accuracy']:.1f} | "
             f"[{Path(proto['out']).name}]({rel(proto['out'])}) |", ""]
    for record in ta2n["figures"][:3]:
        verdict = "right" if record["correct"] else f"wrong, it is {record['truth']}"
        lines += [f"**{Path(record['query']).name}** classified as **{record['predicted']}** "
                  f"({verdict})", "", f"![{Path(record['query']).name}]({rel(record['path'])})",
                  ""]
    return lines


def format_demo(summary: dict) -> str:
    """The table the demo ends with."""
    cfg = summary["config"]
    lead = summary["margin"]
    lines = ["", "=" * 72,
             f"TA2N demo: {cfg['way']}-way {cfg['shots']}-shot on the toy dataset, seed "
             f"{cfg['seed']}",
             f"backbone: {describe_backbone(summary['backbone'])}",
             "",
             f"  {'head':<10} {'test accuracy (%)':<22} episodes"]
    for r in summary["results"]:
        lines.append(f"  {r['head']:<10} {r['accuracy']:6.2f} +- {r['ci95']:<12.2f} "
                     f"{r['episodes']}")
    lines.append(f"  ta2n - protonet: {lead['points']:+.2f} points, 95% intervals "
                 f"{'disjoint' if lead['disjoint'] else 'overlap'}; chance {lead['chance']:.0f} %, "
                 f"{'both' if lead['both_above_chance'] else 'not both'} above it")
    lines += ["", f"  {'phase':<20} {'wall':>9} {'CPU (user+sys)':>16}"]
    for p in summary["phases"]:
        lines.append(f"  {p['name']:<20} {p['seconds']:7.1f} s {p['cpu_seconds']:14.1f} s")
    lines.append(f"  {'total':<20} {summary['total_seconds']:7.1f} s "
                 f"{summary['total_cpu_seconds']:14.1f} s "
                 f"({summary['total_seconds'] / 60:.1f} min wall)")
    own = summary.get("classify")
    if own:
        lines += ["", f"classify (your own clips): {own['ta2n']['queries']} clips of "
                      f"{own['ta2n']['classes']} test classes not in the support set, "
                      f"{cfg['shots']} support clip(s) each",
                  f"  ta2n {own['ta2n']['accuracy']:.1f} %, protonet "
                  f"{own['protonet']['accuracy']:.1f} % on the same clips (chance "
                  f"{100 / own['ta2n']['classes']:.0f} %); predictions {own['ta2n']['out']}"]
    figures = summary["figures"].get("figures") or []
    lines += ["", f"report   {summary['report']}",
              f"figures  {summary['figures_dir']}/ ({len(figures)} pair figures"
              + (", training_curves.png)" if summary["figures"].get("curves") else ")")]
    lines.append("=" * 72)
    return "\n".join(lines)


def _fmt_time(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def write_report(path: str | os.PathLike, *, title: str, intro: list[str],
                 results: list[dict], phases: list[dict], figures: dict,
                 notes: list[str] = (), sections: list[str] = ()) -> Path:
    """A markdown report: what ran, accuracy +- CI per head, time per phase, the figures.

    Args:
        results: dicts with head, accuracy, ci95, episodes, report (JSON path).
        phases: dicts with name, seconds, command (and cpu_seconds).
        figures: {"curves": path or None, "pairs": [visualize records]}; paths are written
            relative to the report's folder.
        sections: further markdown lines, before the notes.
    """
    path = Path(path)
    base = path.parent

    def rel(p: str) -> str:
        return os.path.relpath(p, base)

    lines = [f"# {title}", "", *intro, "", "## Results", "",
             "| head | accuracy (%) | 95% CI | episodes | report |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['head']} | {r['accuracy']:.2f} | +- {r['ci95']:.2f} | "
                     f"{r['episodes']} | [{Path(r['report']).name}]({rel(r['report'])}) |")
    total = sum(p["seconds"] for p in phases)
    cpu = sum(p.get("cpu_seconds", 0.0) for p in phases)
    lines += ["", "## Phases", "", "| phase | wall | CPU (user+sys) | command |",
              "|---|---|---|---|"]
    for p in phases:
        lines.append(f"| {p['name']} | {_fmt_time(p['seconds'])} | "
                     f"{_fmt_time(p.get('cpu_seconds', 0.0))} | `{p['command']}` |")
    lines += [f"| total | {_fmt_time(total)} | {_fmt_time(cpu)} | |", ""]
    if figures.get("curves"):
        lines += ["## Training curves", "", f"![training curves]({rel(figures['curves'])})", ""]
    pairs = figures.get("pairs") or []
    if pairs:
        lines += ["## Alignment (paper Fig. 7 style)", "",
                  "Each figure: support (top) and query (bottom) frames as the backbone saw "
                  "them; the framed, undimmed frames are the window TTM's (a, b) reads; the "
                  "yellow boxes are the regions SC's offsets select; right: TC's attention.", ""]
        shown = [r for r in pairs if r["same_class"]][:3] or pairs[:3]
        for r in shown:
            lines += [f"**{r['query']}** against the prototype of **{r['support_class']}** "
                      f"(distance {r['distance']:.3f}, "
                      f"{'correct' if r['correct'] else 'taken for ' + r['predicted']})", "",
                      f"![{r['query']}]({rel(r['path'])})", ""]
        lines += [f"All {len(pairs)} pair figures:", ""]
        lines += [f"- [{Path(r['path']).name}]({rel(r['path'])}): query {r['query']} vs "
                  f"{r['support_class']}, distance {r['distance']:.3f}" for r in pairs]
        lines.append("")
    lines += list(sections)
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    write_text(path, "\n".join(lines))
    return path
