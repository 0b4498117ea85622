"""Seeing the alignment (`python cli.py visualize`): pair figures in the style of the paper's
Fig. 7, and the run's training curves (align/reports/curves.py).

A pair figure shows one (prototype n, query m) pair of a test episode:

- the T frames of the support and of the query as the backbone saw them, re-decoded from the
  videos with the cache's sampling rule (centre frame of each of T segments, resize, centre crop);
- TTM's action window over each strip: the warp reads the input at s = a*u + b for u in [-1, 1],
  so it spans s in [b - |a|, b + |a|] (clipped to [-1, 1], s = -1 is frame 0, s = +1 frame T-1);
  frames outside are dimmed;
- SC's region as a box on every frame: the mask keeps the part of the map shifted by +o[t] for
  the support and by -o[t] for the query, drawn where its weight is at least 1/2 (offsets are in
  grid units, the H x W map spanning [-1, 1] over the crop);
- TC's attention A[n, m][x, y] as a heatmap (support time x against query time y).

Re-decoding is the one place phase two reads videos, through extract's one public frame reader
(``extract.frames.CacheFrames``), so the pixels are exactly those the cached features were
computed from. A row whose video is not here (a `synth` cache, a dataset root that moved: pass
``--root``, a file that no longer decodes) shows each frame's feature energy (the L2 norm over
channels of its H x W map) instead, and index.json says per figure which it shows and why.

Figures are drawn headless (Agg) at a fixed pixel size: ``pair_figure_size``.
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display is ever needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from tqdm import tqdm  # noqa: E402

from align.episodes import Episode, EpisodeSampler, Stream, load_episodes  # noqa: E402
from align.reports.configs import VisualizeConfig  # noqa: E402
from align.runs import load_head_source, read_metrics, resolve_head_source  # noqa: E402
from cache import FeatureCache, UserError  # noqa: E402
from cache.atomic import write_json  # noqa: E402
from cache.paths import check_writable  # noqa: E402

DPI = 100
FRAME_PX = 104  # displayed side of one frame
GAP_PX = 6  # between frames of a strip
LEFT_PX, HEAT_PX, RIGHT_PX = 150, 230, 80
TOP_PX, STRIP_GAP_PX, BOTTOM_PX = 92, 62, 30
PAIR_CHOICES = ("all", "true", "true+predicted")
SUPPORT_COLOUR, QUERY_COLOUR, BOX_COLOUR = "#1f77b4", "#d62728", "#ffd21f"


def pair_figure_size(frames: int) -> tuple[int, int]:
    """(width, height) in pixels of a pair figure for T = ``frames``."""
    strip = frames * FRAME_PX + (frames - 1) * GAP_PX
    return LEFT_PX + strip + HEAT_PX + RIGHT_PX, TOP_PX + 2 * FRAME_PX + STRIP_GAP_PX + BOTTOM_PX


# ------------------------------------------------------------------------------ geometry
def ttm_window(theta: tuple[float, float], frames: int) -> tuple[float, float]:
    """Fractional frame positions [lo, hi] that TTM's warp (a, b) reads from, within [0, T-1]."""
    a, b = float(theta[0]), float(theta[1])
    lo, hi = np.clip([b - abs(a), b + abs(a)], -1.0, 1.0)
    return (lo + 1) / 2 * (frames - 1), (hi + 1) / 2 * (frames - 1)


def mask_span(offset: float, cells: int, pixels: float) -> tuple[float, float]:
    """[lo, hi) in pixels of one axis of SC's mask for ``offset`` (grid units) on ``cells`` cells
    spanning ``pixels``: the cells whose shifted coordinate stays inside [-1, 1] have weight 1
    and the weight falls to 0 one cell further out, so the half-weight edge lies half a cell
    beyond the last full cell centre."""
    lo = max(-1.0, -1.0 - offset)  # grid coordinate of the first full-weight cell centre
    hi = min(1.0, 1.0 - offset)
    cell = pixels / cells
    to_index = (cells - 1) / 2  # grid coordinate -> cell index
    start = ((lo + 1) * to_index) * cell  # half a cell before the first centre
    stop = ((hi + 1) * to_index + 1) * cell  # half a cell after the last centre
    return float(np.clip(start, 0, pixels)), float(np.clip(stop, 0, pixels))


def mask_box(offset: np.ndarray, height: int, width: int,
             pixels: int) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in pixels of a ``pixels``-square frame for offset (ox, oy)."""
    x0, x1 = mask_span(float(offset[0]), width, pixels)
    y0, y1 = mask_span(float(offset[1]), height, pixels)
    return x0, y0, x1, y1


# ------------------------------------------------------------------------------ frames
def energy_frames(maps: np.ndarray, pixels: int = 112) -> np.ndarray:
    """(T, P, P, 3) uint8 images of each frame's feature energy ||map[:, t, y, x]||_2."""
    energy = np.sqrt((maps.astype(np.float32) ** 2).sum(0))  # (T, H, W)
    energy = (energy - energy.min()) / max(float(np.ptp(energy)), 1e-6)
    t, h, w = energy.shape
    rows, cols = (np.arange(pixels) * h) // pixels, (np.arange(pixels) * w) // pixels
    upsampled = energy[:, rows][:, :, cols]  # (T, P, P) nearest
    return (plt.get_cmap("viridis")(upsampled)[..., :3] * 255).astype(np.uint8)


class FrameSource:
    """Frames for the figures: re-decoded through extract's public reader when the videos are
    here, else each frame's feature energy; ``source(row)`` says which it used, per row.

    Args:
        cache: the open cache (its attrs say the dataset, root, T, resize and crop).
        root: the dataset folder, overriding the one recorded at extraction.
    """

    def __init__(self, cache: FeatureCache, root: str | None = None):
        from extract.frames import CacheFrames

        self.cache = cache
        self.reader = CacheFrames(cache.attrs, cache.video_ids, cache.shape[1], root)
        self._memo: dict[int, tuple[np.ndarray, str]] = {}

    @property
    def note(self) -> str:
        if self.reader.reason is None:
            return (f"frames     re-decoded from {self.reader.root} "
                    f"(centre view, {self.reader.image_size} px crop)")
        return f"frames     feature energy per frame: {self.reader.reason}"

    def __call__(self, row: int) -> np.ndarray:
        """(T, S, S, 3) uint8 frames of cache row ``row``."""
        return self.read(row)[0]

    def source(self, row: int) -> str:
        """Where row ``row``'s frames came from: "video", or "feature energy (<why>)"."""
        return self.read(row)[1]

    def read(self, row: int) -> tuple[np.ndarray, str]:
        from extract.frames import FramesUnavailable

        if row not in self._memo:
            try:
                self._memo[row] = self.reader(row), "video"
            except FramesUnavailable as why:
                self._memo[row] = (energy_frames(self.cache.read_row(row)),
                                   f"feature energy ({why})")
        return self._memo[row]


# ------------------------------------------------------------------------------ drawing
def wrap_class(name: str, width: int = 16) -> str:
    """A class name on short lines for a row label (``a-then-b`` breaks at "then")."""
    return textwrap.fill(name.replace("-then-", " then "), width)


def _strip(frames: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Frames side by side with white gaps: (image, frame side S, step S + gap) in image px."""
    side = frames.shape[1]
    gap = max(1, round(side * GAP_PX / FRAME_PX))
    t = len(frames)
    image = np.full((side, t * side + (t - 1) * gap, 3), 255, np.uint8)
    for i, frame in enumerate(frames):
        image[:, i * (side + gap):i * (side + gap) + side] = frame
    return image, side, side + gap


def _draw_strip(ax, frames: np.ndarray, theta, offsets, sign: int, map_hw: tuple[int, int],
                colour: str, label: str) -> None:
    image, side, step = _strip(frames)
    ax.imshow(image, interpolation="bilinear")
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(side - 0.5, -0.5)
    ax.set_xticks([i * step + side / 2 for i in range(len(frames))])
    ax.set_xticklabels([str(i + 1) for i in range(len(frames))], fontsize=7)
    ax.tick_params(length=0, pad=1)
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8.5, color=colour,
                  labelpad=8, linespacing=1.3)
    if offsets is not None:
        h, w = map_hw
        for t in range(len(frames)):
            x0, y0, x1, y1 = mask_box(sign * offsets[t], h, w, side)
            inset = 1.0  # keep a full-frame box visible inside the frame's edge
            ax.add_patch(Rectangle((t * step + x0 - 0.5 + inset, y0 - 0.5 + inset),
                                   x1 - x0 - 2 * inset, y1 - y0 - 2 * inset, fill=False,
                                   edgecolor=BOX_COLOUR, linewidth=1.3, linestyle=(0, (4, 2))))
    if theta is not None:
        lo, hi = ttm_window(theta, len(frames))
        left, right = lo * step - 0.5, hi * step + side - 0.5
        for a, b in ((-0.5, left), (right, image.shape[1] - 0.5)):  # dim what TTM leaves out
            if b > a:
                ax.add_patch(Rectangle((a, -0.5), b - a, side, color="black", alpha=0.55,
                                       linewidth=0))
        ax.add_patch(Rectangle((left, -0.5), right - left, side, fill=False, edgecolor=colour,
                               linewidth=2.5, clip_on=False))
        a_val, b_val = float(theta[0]), float(theta[1])
        reversed_note = ", reversed" if a_val < 0 else ""
        ax.text(left, -4, f"TTM window  a={a_val:+.2f}  b={b_val:+.2f}{reversed_note}",
                fontsize=8, color=colour, va="bottom", ha="left")


def draw_pair(path: str | os.PathLike, *, support_frames: np.ndarray, query_frames: np.ndarray,
              support_theta=None, query_theta=None, offsets: np.ndarray | None = None,
              attention: np.ndarray | None = None, map_hw: tuple[int, int] = (7, 7),
              title: str = "", support_label: str = "support", query_label: str = "query",
              ) -> Path:
    """Draw one pair figure (Fig. 7 style) to ``path``; see the module docstring.

    Args:
        support_frames, query_frames: (T, S, S, 3) uint8.
        support_theta, query_theta: TTM's (a, b), or None when TTM is off.
        offsets: (T, 2) SC offsets (ox, oy) in grid units, or None when SC is off.
        attention: (T, T) TC attention (support time x, query time y), or None.
        map_hw: (H, W) of the feature maps the offsets refer to.
    """
    frames = len(support_frames)
    width, height = pair_figure_size(frames)
    strip_w = frames * FRAME_PX + (frames - 1) * GAP_PX
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)

    def box(x, y, w, h):  # pixel rectangle from the top-left -> figure fractions
        return [x / width, 1 - (y + h) / height, w / width, h / height]

    fig.text(20 / width, 1 - 8 / height, title, fontsize=10, va="top", ha="left",
             linespacing=1.5)
    top = TOP_PX
    ax_s = fig.add_axes(box(LEFT_PX, top, strip_w, FRAME_PX))
    _draw_strip(ax_s, support_frames, support_theta, offsets, +1, map_hw, SUPPORT_COLOUR,
                support_label)
    ax_q = fig.add_axes(box(LEFT_PX, top + FRAME_PX + STRIP_GAP_PX, strip_w, FRAME_PX))
    _draw_strip(ax_q, query_frames, query_theta, offsets, -1, map_hw, QUERY_COLOUR, query_label)

    heat_x = LEFT_PX + strip_w + 40
    heat_side = min(HEAT_PX - 40, 2 * FRAME_PX + STRIP_GAP_PX - 20)
    ax_h = fig.add_axes(box(heat_x, top + 6, heat_side, heat_side))
    if attention is not None:
        image = ax_h.imshow(attention, cmap="magma", vmin=0, vmax=max(float(attention.max()),
                                                                       1e-6))
        ticks = range(frames)
        ax_h.set_xticks(list(ticks), [str(i + 1) for i in ticks], fontsize=7)
        ax_h.set_yticks(list(ticks), [str(i + 1) for i in ticks], fontsize=7)
        ax_h.set_xlabel("query frame", fontsize=8, color=QUERY_COLOUR)
        ax_h.set_ylabel("support frame", fontsize=8, color=SUPPORT_COLOUR)
        ax_h.set_title("TC attention", fontsize=9)
        cax = fig.add_axes(box(heat_x + heat_side + 8, top + 6, 10, heat_side))
        fig.colorbar(image, cax=cax).ax.tick_params(labelsize=7)
    else:
        ax_h.axis("off")
        ax_h.text(0.5, 0.5, "TC off", ha="center", va="center", fontsize=10, color="grey")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ the command
def _pairs(kind: str, targets: np.ndarray, predicted: np.ndarray, way: int) -> list[tuple]:
    """(n, m) pairs to draw for an episode."""
    if kind == "all":
        return [(n, m) for m in range(len(targets)) for n in range(way)]
    out = []
    for m, (t, p) in enumerate(zip(targets, predicted)):
        out.append((int(t), m))
        if kind == "true+predicted" and p != t:
            out.append((int(p), m))
    return out


def _episodes(cfg: VisualizeConfig, cache: FeatureCache, shot: int) -> list[Episode]:
    if cfg.episodes_from:
        episodes, header = load_episodes(cfg.episodes_from, cache)
        return episodes[:cfg.episodes]
    sampler = EpisodeSampler(cache, cfg.split, way=cfg.way, shot=shot, queries=cfg.queries,
                             seed=cfg.seed, stream=Stream.TEST)
    return sampler.episodes(0, cfg.episodes)


def visualize(cfg: VisualizeConfig, *, device: torch.device, log=print,
              progress: bool = True) -> dict:
    """Draw the pair figures of ``cfg.episodes`` episodes and the run's training curves.

    Returns a summary: out folder, curves path (or None), and one record per pair figure
    (episode, query / support video ids and classes, same class, predicted, distance, path).
    """
    if cfg.pairs not in PAIR_CHOICES:
        raise UserError(f"--pairs must be one of {', '.join(PAIR_CHOICES)}")
    source = resolve_head_source(checkpoint=cfg.checkpoint, cache=cfg.cache, way=cfg.way,
                                 episodes_from=cfg.episodes_from, head_option=False, log=log)
    cfg = replace(cfg, way=source.way)
    checkpoint, cache_path, shot = source.checkpoint, source.cache, source.shot
    out = Path(cfg.out or Path(checkpoint).parent / "figures")
    check_writable(out, "folder", "--out")
    out.mkdir(parents=True, exist_ok=True)
    curves = None
    metrics = Path(checkpoint).parent / "metrics.csv"
    if metrics.exists() and read_metrics(metrics):
        from align.reports.curves import plot_training_curves

        way = source.train.get("way")
        curves = str(plot_training_curves(metrics, out / "training_curves.png",
                                          chance=100 / way if way else None))
    records = []
    with FeatureCache.open(cache_path) as cache:
        head, _ = load_head_source(source, cache, log=log,
                                   allow_other_features=cfg.allow_other_features)
        head = head.to(device).eval()
        frames_of = FrameSource(cache, cfg.root)
        log(frames_of.note)
        c, t, h, w = cache.shape
        episodes = _episodes(cfg, cache, shot)
        names, ids = cache.classes, cache.video_ids
        jobs = []
        for e, episode in enumerate(episodes):
            support = torch.from_numpy(cache.read_rows(episode.support, dtype="float32"))
            query = torch.from_numpy(cache.read_rows(episode.query, dtype="float32"))
            info = head.explain(support.to(device), query.to(device), episode.way,
                                episode.shot)
            info = {k: v.float().cpu().numpy() for k, v in info.items()}
            predicted = info["logits"].argmax(-1)  # (M,)
            targets = episode.query_targets
            for n, m in _pairs(cfg.pairs, targets, predicted, episode.way):
                jobs.append((e, episode, info, predicted, targets, n, m))
        for e, episode, info, predicted, targets, n, m in tqdm(
                jobs, desc="visualize", unit="fig", disable=not progress):
            ref = int(episode.support[n * episode.shot])  # a prototype shows its first shot
            q_row = int(episode.query[m])
            s_class = names[int(episode.classes[n])]
            q_class = names[int(episode.classes[targets[m]])]
            p_class = names[int(episode.classes[predicted[m]])]
            distance = float(info["distances"][n, m])
            same = n == targets[m]
            verdict = ("classified correctly" if predicted[m] == targets[m]
                       else f"wrongly taken for {p_class}")
            title = (f"episode {e}, query {m} ({ids[q_row]}) against the prototype of "
                     f"{'its own class' if same else 'another class'}, {s_class}\n"
                     f"distance {distance:.3f}   ·   query {verdict}")
            shots_note = f" (1st of {episode.shot})" if episode.shot > 1 else ""
            path = draw_pair(
                out / f"ep{e:02d}_q{m:02d}_p{n}.png",
                support_frames=frames_of(ref), query_frames=frames_of(q_row),
                support_theta=info["ttm_support"][n * episode.shot] if "ttm_support" in info
                else None,
                query_theta=info["ttm_query"][m] if "ttm_query" in info else None,
                offsets=info["sc_offsets"][n, m] if "sc_offsets" in info else None,
                attention=info["tc_attention"][n, m] if "tc_attention" in info else None,
                map_hw=(h, w), title=title,
                support_label=f"support{shots_note}\n{wrap_class(s_class)}",
                query_label=f"query\n{wrap_class(q_class)}")
            records.append({"episode": e, "query": str(ids[q_row]), "support": str(ids[ref]),
                            "query_class": q_class, "support_class": s_class,
                            "same_class": bool(same), "predicted": p_class,
                            "correct": bool(predicted[m] == targets[m]),
                            "distance": round(distance, 4), "path": str(path),
                            "frames": {"support": frames_of.source(ref),
                                       "query": frames_of.source(q_row)}})
    index = out / "index.json"
    write_json(index, {"checkpoint": checkpoint, "cache": cache_path, "curves": curves,
                       "figures": records})
    return {"out": str(out), "curves": curves, "figures": records, "index": str(index),
            "frames": frames_of.note}


def format_visualize(summary: dict) -> str:
    """What `visualize` prints."""
    figures = summary["figures"]
    lines = [summary["frames"],
             f"figures    {len(figures)} pair figures in {summary['out']}"]
    if figures:
        lines.append(f"           e.g. {figures[0]['path']}")
    lines.append(f"curves     {summary['curves'] or '(no metrics.csv next to the checkpoint)'}")
    lines.append(f"index      {summary['index']}")
    return "\n".join(lines)


def png_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from a PNG's header; raises ValueError when it is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
