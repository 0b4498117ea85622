"""Command line: click wiring only; each command parses options, calls one function, prints.

    python cli.py extract --dataset ucf101        # phase one, once per dataset
    python cli.py train-heads --shots 5           # phase two, minutes per experiment
    python cli.py evaluate --episodes 5000
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys

# `python cli.py demo` runs every phase in this process on a small shared CPU: OpenMP threads
# that spin while idle take the core the working thread needs (on this project's 2-core machine
# 12 TA2N episodes took 70-136 s wall spinning, 25-31 s passive). libgomp reads the policy once,
# when torch loads, so it is set before the imports below; a value the user set is kept.
if sys.argv[1:2] == ["demo"]:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from align.evaluate import EvalConfig  # noqa: E402
from align.models import (  # noqa: E402
    check_head_options,
    describe_heads,
    head_names,
    parse_head_options,
)
from align.options import DEFAULT_SHOT, DEFAULT_WAY  # noqa: E402
from align.recipes import TrainConfig  # noqa: E402
from align.reports.configs import (  # noqa: E402
    EmbeddingConfig,
    MisalignmentConfig,
    VisualizeConfig,
)
from align.sweep import SweepConfig  # noqa: E402
from cache import FeatureCache, UserError, format_info  # noqa: E402
from cache.options import click_callback, options_from  # noqa: E402
from classify.config import ClassifyConfig  # noqa: E402
from demo import DemoConfig  # noqa: E402
from extract.adapt import AdaptConfig  # noqa: E402
from extract.backbones import parse_backbone  # noqa: E402
from extract.plan import ExtractConfig  # noqa: E402
from extract.toydata import ToyConfig  # noqa: E402

DEVICE_CHOICES = click.Choice(["auto", "cpu", "cuda"])


def pick_device(name: str) -> torch.device:
    """The one place a device is chosen; everything below receives it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UserError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device")
    if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise UserError(f"device {name!r}: torch sees {torch.cuda.device_count()} CUDA devices")
    return torch.device(name)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """TA2N few-shot action recognition on cached backbone features."""


# ------------------------------------------------------------------------------------ info
@cli.command()
@click.argument("cache_path", metavar="CACHE")
@click.option("--verify", is_flag=True,
              help="Read every done row and check it (stored, checksum); exit 1 if any is "
                   "missing or damaged.")
def info(cache_path, verify):
    """Summarise a feature cache: rows per split, classes, done / not done, size on disk."""
    from cache.store import format_verify

    with FeatureCache.open(cache_path) as cache:
        click.echo(format_info(cache.info()))
        if not verify:
            return
        rows = cache.rows()
        with tqdm(total=len(rows), desc="verify", unit="row", dynamic_ncols=True) as bar:
            damaged = cache.verify(rows, progress=bar.update)
        click.echo(format_verify(len(rows), damaged, cache.checksummed))
    if damaged:
        raise UserError(f"{len(damaged)} done rows of {cache_path} are missing or damaged; "
                        "rerun the extract command that made it, with --verify, to extract them "
                        "again")


# ------------------------------------------------------------------------------------ extract
@cli.command()
@options_from(ExtractConfig)
@click.option("--splits", "split_list", default="train,val,test", show_default=True,
              help="Comma-separated splits to extract.")
@click.option("--overwrite", is_flag=True, default=False,
              help="Replace the cache at --out (only ever a cache: anything else is refused).")
@click.option("--verify", is_flag=True, default=False,
              help="Before resuming, read and check every done row (re-extracts those that "
                   "fail); without it only done rows with no stored data are redone.")
@click.option("--device", type=DEVICE_CHOICES, default="auto", show_default=True)
def extract(split_list, device, **options):
    """Phase one: decode videos, sample T frames, run the frozen backbone, write the cache.

    Under torchrun (RANK / WORLD_SIZE set) each process extracts a disjoint shard of the rows
    into the same Zarr cache, on GPU LOCAL_RANK. Rerunning the command resumes.
    """
    from extract.pipeline import run_extract
    from extract.plan import Shard

    splits = tuple(s.strip() for s in split_list.split(",") if s.strip())
    config = ExtractConfig(splits=splits, **options)
    shard = Shard.from_env()
    torch_device = pick_device(device)
    if torch_device.type == "cuda" and torch_device.index is None:
        torch_device = torch.device("cuda", shard.local_rank % torch.cuda.device_count())
    summary = run_extract(config, torch_device, shard, echo=lambda m: click.echo(m, err=True))
    click.echo("\n".join(summary.lines()))


# ------------------------------------------------------------------------------------ adapt
@cli.command("adapt-backbone")
@options_from(AdaptConfig)
@click.option("--resume", is_flag=True, default=False,
              help="Continue the run of --out from its last epoch.")
@click.option("--overwrite", is_flag=True, default=False,
              help="Start again over an earlier run of --out.")
@click.option("--device", type=DEVICE_CHOICES, default="auto", show_default=True)
def adapt_backbone(device, **options):
    """Train the backbone as a TSN classifier on the train split's (base) classes, once per
    dataset, for `extract --weights FILE`.

    Under torchrun each process trains on its share of every batch (DDP, on GPU LOCAL_RANK).
    """
    from extract.adapt import next_command
    from extract.adapt_train import run_adapt
    from extract.plan import Shard

    config = AdaptConfig(**options)
    shard = Shard.from_env()
    torch_device = pick_device(device)
    if torch_device.type == "cuda" and torch_device.index is None:
        torch_device = torch.device("cuda", shard.local_rank % torch.cuda.device_count())
    summary = run_adapt(config, torch_device, shard, echo=lambda m: click.echo(m, err=True))
    if shard.rank == 0:
        click.echo("\n".join(summary.lines()))
        if not summary.stopped:
            click.echo(f"next     {next_command(config)}")


# ------------------------------------------------------------------------------------ train-heads
@cli.command()
def heads():
    """List the heads and their own options (train-heads --head-option KEY=VALUE)."""
    click.echo(describe_heads())


PRELOAD_CHOICES = click.Choice(["auto", "ram", "device", "none"])
HEAD_CHOICES = click.Choice(head_names())


@cli.command("train-heads")
@click.option("--cache", "cache_path", default=None,
              help="Feature cache [default: the most recently extracted one].")
@options_from(TrainConfig)
@click.option("--head-option", "head_option_pairs", multiple=True, metavar="KEY=VALUE",
              help="One of the head's own options (repeatable), e.g. ttm=false or "
                   "sc_mode=grid for TA2N; `python cli.py heads` lists them.")
@click.option("--device", default="auto", show_default=True, type=DEVICE_CHOICES)
@click.option("--resume", default=None, metavar="RUN_DIR",
              help="Continue a killed or interrupted run exactly (its saved config is used).")
def train_heads(cache_path, head_option_pairs, device, resume, **options):
    """Phase two: train the alignment heads episodically from a cache."""
    from align.train import format_summary, train

    head_options = check_head_options(options["head"],
                                      parse_head_options(head_option_pairs),
                                      parse_text=True)
    cfg = TrainConfig(cache=cache_path, head_options=head_options, **options)
    summary = train(None if resume else cfg, device=pick_device(device), resume=resume,
                    log=click.echo)
    click.echo(format_summary(summary))
    if summary["interrupted"]:
        raise SystemExit(130)  # like a shell's Ctrl-C: `train-heads && evaluate` stops here


# ------------------------------------------------------------------------------------ evaluate
ALLOW_OTHER_FEATURES_HELP = ("Score a checkpoint on a cache of other features than it was "
                             "trained on (another backbone, weights, preprocessing): refused "
                             "without it; with it, a warning, recorded in the report.")


@cli.command()
@click.option("--checkpoint", default=None,
              help="A head from train-heads or the authors' code [default: the latest run's].")
@click.option("--head", "head_kind", default=None,
              type=click.Choice(head_names(training_free=True)),
              help="A training-free baseline instead of a checkpoint.")
@click.option("--cache", "cache_path", default=None,
              help="[default: the checkpoint's run's cache, else the latest extracted one]")
@click.option("--shots", type=click.IntRange(min=1),
              default=None, help=f"[default: the run's K, else {DEFAULT_SHOT}]")
@click.option("--way", type=click.IntRange(min=2), default=None,
              help=f"[default: the run's way, else {DEFAULT_WAY}]")
@options_from(EvalConfig)
@click.option("--report", default=None, metavar="FILE",
              help="JSON report [default: next to the checkpoint, or under runs/].")
@click.option("--device", default="auto", show_default=True, type=DEVICE_CHOICES)
@click.option("--allow-other-features", is_flag=True, help=ALLOW_OTHER_FEATURES_HELP)
def evaluate(checkpoint, head_kind, cache_path, shots, way, device, report, allow_other_features,
             **options):
    """Evaluate a head on test episodes: accuracy with its 95% confidence interval."""
    from align.evaluate import evaluate_command

    result = evaluate_command(EvalConfig(**options), checkpoint=checkpoint, head_kind=head_kind,
                              cache_path=cache_path, shot=shots, way=way,
                              device=pick_device(device),
                              report=report, log=click.echo,
                              allow_other_features=allow_other_features)
    click.echo(result["summary"])
    click.echo(f"report     {result['report']}  ({result['episodes_per_s']:.1f} episodes/s)")


# ------------------------------------------------------------------------------------ sweep
def _int_list(text: str | None, option: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers, got {text!r}") from None


@cli.command()
@click.argument("source", metavar="PRESET|FILE")
@click.option("--shots", default=None, help="Comma-separated K values, e.g. 1,5 "
              "[default: the preset's or file's; 1 for table3 / table4 / heads / table2].")
@click.option("--seeds", "seeds_text", default="0,1,2", show_default=True,
              help="Each run is trained and tested once per seed.")
@click.option("--heads", default=None, help="Comma-separated registered heads for the heads, "
              "table2 and shots presets.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="A train-heads option for every run, e.g. --set epochs=6 (repeatable).")
@click.option("--devices", "device_names", default="auto", show_default=True,
              help="auto, cpu, cuda, or a list (cuda:0,cuda:1): one process per device.")
@options_from(SweepConfig)
def sweep(source, shots, seeds_text, heads, assignments, device_names, **options):
    """A paper table in one command: every run of a preset (table3, table4, heads, table2,
    shots) or sweep file (TOML / JSON), per seed, on the same saved test episodes, with paired
    tests; writes sweep.csv, sweep.md, sweep.png. Rerunning resumes."""
    from align.reports.sweep import sweep_command
    from align.sweep import format_sweep, parse_assignments

    names = [d.strip() for d in device_names.split(",") if d.strip()]
    cfg = SweepConfig(seeds=_int_list(seeds_text, "--seeds"),
                      shots=_int_list(shots, "--shots"), overrides=parse_assignments(assignments),
                      # on a cluster each worker resolves the device (align/cluster.py)
                      devices=(tuple(names) if options["scheduler"] else
                               tuple(str(pick_device(d)) for d in names)), **options)
    summary = sweep_command(source, cfg, log=click.echo,
                            heads=None if heads is None else [h.strip() for h in heads.split(",")])
    click.echo(format_sweep(summary))
    if summary["interrupted"]:
        raise SystemExit(130)


# ------------------------------------------------------------------------------------ analyze
@cli.group()
def analyze():
    """Measure misalignment, see what alignment does, compare evaluation reports."""


def _analysis_cache(cache_path: str | None) -> str:
    from cache.latest import resolve_cache

    return resolve_cache(cache_path, click.echo, label="cache      ")


@analyze.command("misalignment")
@click.argument("cache_path", metavar="[CACHE]", required=False)
@click.option("--out", "out_dir", default=None,
              help="Output folder [default: runs/analyze-<cache name>].")
@options_from(MisalignmentConfig)
@click.option("--device", default="auto", show_default=True, type=DEVICE_CHOICES)
def analyze_misalignment(cache_path, out_dir, device, **options):
    """Action start times and AEM score of a cache (paper Fig. 2, Table 1)."""
    from align.reports.common import default_out
    from align.reports.misalignment import format_misalignment, run_misalignment

    cache_path = _analysis_cache(cache_path)
    cfg = MisalignmentConfig(**options)
    summary = run_misalignment(cache_path, out_dir or default_out(cache_path), cfg,
                               pick_device(device))
    click.echo(format_misalignment(summary))


@analyze.command("embedding")
@click.argument("cache_path", metavar="[CACHE]", required=False)
@click.option("--checkpoint", default=None,
              help="A trained head [default: the latest run's best.pt, on its cache].")
@click.option("--head", "head_kind", default=None, type=click.Choice(["ta2n", "protonet"]),
              help="An untrained head instead of a checkpoint (protonet: after = before).")
@click.option("--out", "out_dir", default=None,
              help="Output folder [default: runs/analyze-<cache name>].")
@click.option("--way", type=click.IntRange(min=2), default=None,
              help=f"[default: the run's way, else {DEFAULT_WAY}]")
@click.option("--shots", type=click.IntRange(min=1), default=None,
              help=f"[default: the run's K, else {DEFAULT_SHOT}]")
@options_from(EmbeddingConfig)
@click.option("--device", default="auto", show_default=True, type=DEVICE_CHOICES)
@click.option("--allow-other-features", is_flag=True, help=ALLOW_OTHER_FEATURES_HELP)
def analyze_embedding(cache_path, checkpoint, head_kind, out_dir, shots, way, device,
                      allow_other_features, **options):
    """t-SNE of queries and prototypes before / after alignment (paper Fig. 8)."""
    from align.reports.embedding import embedding_command, format_embedding

    summary = embedding_command(EmbeddingConfig(**options), checkpoint=checkpoint,
                                head_kind=head_kind, cache_path=cache_path, shot=shots,
                                way=way, out_dir=out_dir, device=pick_device(device),
                                log=click.echo, allow_other_features=allow_other_features)
    click.echo(format_embedding(summary))


@analyze.command("compare")
@click.argument("report_a", metavar="REPORT_A")
@click.argument("report_b", metavar="REPORT_B")
@click.option("--out", "out_dir", default=None,
              help="Output folder [default: runs/analyze-<REPORT_B name>].")
@click.option("--top", default=3, show_default=True, help="How many top-gaining classes to name.")
@click.option("--allow-different-episodes", is_flag=True,
              help="Compare reports made on different episodes (with a warning).")
def analyze_compare(report_a, report_b, out_dir, top, allow_different_episodes):
    """Per-class accuracy gain of REPORT_B over REPORT_A, same episodes (paper Fig. 9)."""
    from align.reports.common import default_out
    from align.reports.compare import format_compare, run_compare

    summary = run_compare(report_a, report_b, out_dir or default_out(report_b), top=top,
                          allow_different=allow_different_episodes)
    click.echo(format_compare(summary))


# ------------------------------------------------------------------------------------ synth
@cli.command()
@click.option("--out", default=None, help="[default: caches/synthetic.zarr]")
@click.option("--channels", default=64, show_default=True, type=click.IntRange(min=1), help="C")
@click.option("--frames", default=8, show_default=True, type=click.IntRange(min=4), help="T")
@click.option("--size", default=7, show_default=True, type=click.IntRange(min=4), help="H = W")
@click.option("--patterns", default=4, show_default=True, type=click.IntRange(min=1),
              help="Shared patterns every class is made of.")
@click.option("--length", default=4, show_default=True, type=click.IntRange(min=0),
              help="Patterns per class sequence (no immediate repeats); 0: every class is a "
                   "permutation of all patterns, so classes differ only in order.")
@click.option("--train-classes", default=64, show_default=True, type=click.IntRange(min=0))
@click.option("--val-classes", default=16, show_default=True, type=click.IntRange(min=0))
@click.option("--test-classes", default=24, show_default=True, type=click.IntRange(min=0))
@click.option("--videos-per-class", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--min-duration", default=0.5, show_default=True,
              type=click.FloatRange(min=0, max=1, min_open=True),
              help="Shortest action window, fraction of T.")
@click.option("--evolution", default=2.0, show_default=True, type=click.FloatRange(min=1),
              help="Progress exponents in [1/e, e].")
@click.option("--background", default=0.3, show_default=True, type=click.FloatRange(min=0))
@click.option("--noise", default=0.3, show_default=True, type=click.FloatRange(min=0))
@click.option("--aug-views", default=0, show_default=True, type=click.IntRange(min=0),
              help="Extra training views per row.")
@click.option("--seed", default=0, show_default=True)
@click.option("--backend", default="zarr", show_default=True, type=click.Choice(["zarr", "hdf5"]))
@click.option("--overwrite", is_flag=True,
              help="Replace the cache at --out (only ever a cache: anything else is refused).")
def synth(out, backend, overwrite, **options):
    """Write a synthetic cache: classes are orders of shared patterns, misaligned in time/space."""
    from cache.latest import default_cache_path
    from cache.synthetic import SynthConfig, generate_synthetic

    out = out or default_cache_path("synthetic", backend)
    summary = generate_synthetic(out, SynthConfig(**options), backend=backend,
                                 overwrite=overwrite)
    click.echo(f"synthetic cache {summary['path']}: {summary['rows']} videos of "
               f"{summary['classes']} classes {summary['per_split']}, C,T,H,W = "
               f"{tuple(summary['shape'])}")


# ------------------------------------------------------------------------------------ toy-data
@cli.command("toy-data")
@click.option("--out", default="data/demo", show_default=True,
              help="Folder for videos/, splits/ and toydata.json.")
@options_from(ToyConfig)
def toy_data(out, **options):
    """Write the built-in demo dataset: an actor taking a class-specific sequence of poses."""
    from extract.toydata import format_toy_dataset, make_toy_dataset

    click.echo(format_toy_dataset(make_toy_dataset(out, ToyConfig(**options))))


# ------------------------------------------------------------------------------------ visualize
@cli.command()
@options_from(VisualizeConfig)
@click.option("--device", default="auto", show_default=True, type=DEVICE_CHOICES)
@click.option("--allow-other-features", is_flag=True, default=False,
              help=ALLOW_OTHER_FEATURES_HELP)
def visualize(device, **options):
    """Pair figures (paper Fig. 7 style: frames, TTM window, SC boxes, TC attention) and
    training curves of a trained head."""
    from align.reports.pairs import format_visualize
    from align.reports.pairs import visualize as draw

    summary = draw(VisualizeConfig(**options), device=pick_device(device), log=click.echo)
    click.echo(format_visualize(summary))


# ------------------------------------------------------------------------------------ classify
def _check_optional_backbone(ctx, param, value):
    """classify's --backbone, checked by the registry as extract's is (None: not given)."""
    return value if value is None else click_callback(parse_backbone)(ctx, param, value)


@cli.command()
@click.option("--support", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder with one sub-folder per class (its name is the label) holding >= 1 "
                   "clip each (video files or frame folders).")
@click.option("--query", "query", required=True, multiple=True, type=click.Path(exists=True),
              help="A clip file or a folder (searched recursively); repeat for more. Clips "
                   "under <folder>/<support class>/ have a known label: accuracy is printed.")
@click.option("--backbone", default=None, callback=_check_optional_backbone,
              help="With --head and no --cache: the backbone to run on the clips.")
@options_from(ClassifyConfig)
@click.option("--device", default="auto", show_default=True, type=DEVICE_CHOICES)
def classify(device, **options):
    """Label your own clips from a few example clips per class (a trained checkpoint or a
    training-free head); see docs/own-videos.md."""
    from classify.command import classify_command

    classify_command(ClassifyConfig(**options), device=pick_device(device),
                     log=click.echo)


# ------------------------------------------------------------------------------------ demo
@cli.command()
@options_from(DemoConfig)
@click.option("--device", default="auto", show_default=True, type=DEVICE_CHOICES)
def demo(**options):
    """The whole pipeline on the built-in toy dataset (what `make demo` runs): toy-data ->
    adapt-backbone -> extract -> train-heads -> evaluate (ta2n, protonet) -> visualize, with a
    summary."""
    from demo import DemoConfig, format_demo, run_demo

    summary = run_demo(DemoConfig(**options), echo=click.echo, runner=run_in_process)
    click.echo(format_demo(summary))


def run_in_process(args: list[str], workdir: str, quiet: bool) -> tuple[int, str]:
    """Run ``python cli.py ARGS`` inside this process, in ``workdir``: (exit status, its output
    when ``quiet``, else ""). The demo's runner: a process per phase would import torch again
    every time."""
    output = io.StringIO()
    hide = (contextlib.redirect_stdout(output), contextlib.redirect_stderr(output)) \
        if quiet else ()
    with contextlib.chdir(workdir), contextlib.ExitStack() as stack:
        for context in hide:
            stack.enter_context(context)
        try:
            cli.main(args=args, prog_name="cli.py", standalone_mode=False)
            status = 0
        except click.ClickException as e:
            e.show()
            status = e.exit_code
        except click.Abort:
            click.echo("Aborted!", err=True)
            status = 1
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
    return status, output.getvalue()


if __name__ == "__main__":
    cli()
