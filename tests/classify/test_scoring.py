"""classify's phase two: an evaluate episode gives evaluate's logits for every registered head
(1 and 5 shots); the K rule for classes of any clip count equals the head's own forward, class by
class; queries are scored independently of how they are blocked; a 1-shot TA2N checkpoint takes
classes of 2 clips."""

import numpy as np
import pytest
import torch

import classify.scoring as scoring
from align.checkpoints import load_head_checkpoint, save_head
from align.episodes import EpisodeSampler, Stream
from align.evaluate import run_episodes
from align.feed import Feeder
from align.models import build_head, head_names
from cache import FeatureCache
from cache.synthetic import SynthConfig, generate_synthetic
from classify.scoring import class_logits, explain_class, prototype_units

CPU = torch.device("cpu")
F64 = torch.float64


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A small synthetic cache: C = 8, T = 8, 4 x 4 maps, 6 test classes of 7 videos."""
    path = tmp_path_factory.mktemp("synth") / "synth.zarr"
    generate_synthetic(str(path), SynthConfig(channels=8, frames=8, size=4, train_classes=0,
                                              val_classes=0, test_classes=6, videos_per_class=7,
                                              seed=3), progress=False)
    return str(path)


# ARN's forward takes seconds on this CPU even at C = 8: its cases run with the slow tests
KINDS = [pytest.param(k, marks=pytest.mark.slow) if k == "arn" else k for k in head_names()]


def head_of(kind: str, shot: int):
    return build_head(kind, channels=8, frames=8, height=4, width=4, shot=shot, seed=1).double()


@pytest.mark.parametrize("shot", [1, 5])
@pytest.mark.parametrize("kind", KINDS)
def test_an_episode_gives_evaluates_logits(synth, kind, shot):
    """Support clips of 5 classes (K each, the checkpoint's K) and their queries score exactly
    as the head scores that episode, and predict what evaluate's path predicts for it."""
    with FeatureCache.open(synth) as cache:
        episode = EpisodeSampler(cache, "test", way=5, shot=shot, queries=1, seed=7,
                                 stream=Stream.TEST).episode(0)
        support = torch.from_numpy(cache.read_rows(episode.support, dtype="float32")).double()
        query = torch.from_numpy(cache.read_rows(episode.query, dtype="float32")).double()
        head = head_of(kind, shot).eval()
        feeder = Feeder(cache, "test", device=CPU, dtype=F64, preload="ram", progress=False)
        evaluated = run_episodes(head, feeder, [episode], device=CPU, progress=False)[0]
    members = [list(range(c * shot, (c + 1) * shot)) for c in range(5)]
    got = class_logits(head, support, members, query, device=CPU, dtype=F64)  # (M, 5)
    with torch.no_grad():
        expected = head(support, query, 5, shot)  # (M, 5) the head's own forward
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(got.argmax(-1).numpy(), evaluated)


def by_hand(head, support, members, query):
    """The K rule written out one class at a time with the head's plain forward."""
    columns = []
    with torch.no_grad():
        for clips in members:
            if head.shot_rule == "one":  # the mean of each clip's 1-shot logit
                columns.append(torch.stack([head(support[[i]], query, 1, 1)[:, 0]
                                            for i in clips]).mean(0))
            else:  # one prototype of all the clips; "many" gives a lone clip twice
                shots = clips * 2 if head.shot_rule == "many" and len(clips) == 1 else clips
                columns.append(head(support[shots], query, 1, len(shots))[:, 0])
    return torch.stack(columns, 1)  # (M, N)


@pytest.mark.parametrize("shot", [1, 5])
@pytest.mark.parametrize("kind", KINDS)
def test_classes_of_any_clip_count(kind, shot):
    """7 classes (more than a 5-way checkpoint's) of 1, 2, 3 ... clips, K differing from the
    checkpoint's and between classes: each class's logit is the head's own on that class."""
    g = torch.Generator().manual_seed(0)
    counts = [1, 2, 3, 1, 5, 2, 6]
    support = torch.randn(sum(counts), 8, 8, 4, 4, generator=g, dtype=F64)
    query = torch.randn(4, 8, 8, 4, 4, generator=g, dtype=F64)
    starts = np.cumsum([0] + counts)
    members = [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:])]
    head = head_of(kind, shot).eval()
    got = class_logits(head, support, members, query, device=CPU, dtype=F64)  # (4, 7)
    torch.testing.assert_close(got, by_hand(head, support, members, query), rtol=1e-10,
                               atol=1e-10)


def test_the_rule_of_each_head():
    assert head_of("ta2n", 1).shot_rule == "one"
    assert head_of("ta2n", 5).shot_rule == "many"
    assert {head_of(k, 1).shot_rule for k in head_names() if k != "ta2n"} == {"any"}
    assert prototype_units("one", [[0, 1], [2]]) == [(0, [0]), (0, [1]), (1, [2])]
    assert prototype_units("many", [[0, 1], [2]]) == [(0, [0, 1]), (1, [2, 2])]
    assert prototype_units("any", [[0, 1], [2]]) == [(0, [0, 1]), (1, [2])]


def test_one_shot_checkpoint_takes_two_clips_per_class(tmp_path):
    """The 1-shot head loaded from its checkpoint (no multi-shot weights) with 2 clips a class:
    no 'missing keys', and each class's logit is the mean of its clips' 1-shot logits."""
    save_head(build_head("ta2n", channels=8, frames=8, height=4, width=4, shot=1, seed=2),
              tmp_path / "best.pt")
    head, _ = load_head_checkpoint(tmp_path / "best.pt")
    head = head.double()
    g = torch.Generator().manual_seed(1)
    support = torch.randn(6, 8, 8, 4, 4, generator=g, dtype=F64)
    query = torch.randn(3, 8, 8, 4, 4, generator=g, dtype=F64)
    members = [[0, 1], [2, 3], [4, 5]]
    got = class_logits(head, support, members, query, device=CPU, dtype=F64)
    with torch.no_grad():
        single = head(support, query, 6, 1)  # (3, 6): every clip a class of its own
    torch.testing.assert_close(got, single.view(3, 3, 2).mean(-1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["ta2n", "trx"])
def test_blocks_and_calls_do_not_change_a_querys_logits(kind, monkeypatch):
    """Queries go in blocks of QUERY_BLOCK and calls of PAIRS_PER_CALL pairs: any split gives
    the same logits (a query's logit depends on that query alone)."""
    g = torch.Generator().manual_seed(2)
    support = torch.randn(5, 8, 8, 4, 4, generator=g, dtype=F64)
    query = torch.randn(7, 8, 8, 4, 4, generator=g, dtype=F64)
    members = [[0, 1], [2], [3, 4]]
    head = head_of(kind, 2).eval()
    whole = class_logits(head, support, members, query, device=CPU, dtype=F64)
    monkeypatch.setattr(scoring, "QUERY_BLOCK", 3)
    monkeypatch.setattr(scoring, "PAIRS_PER_CALL", 4)
    torch.testing.assert_close(class_logits(head, support, members, query, device=CPU,
                                            dtype=F64), whole, rtol=1e-10, atol=1e-10)


def test_explain_shows_the_classs_prototype():
    g = torch.Generator().manual_seed(3)
    support = torch.randn(3, 8, 8, 4, 4, generator=g, dtype=F64)
    query = torch.randn(1, 8, 8, 4, 4, generator=g, dtype=F64)
    many = head_of("ta2n", 2).eval()
    record, shown = explain_class(many, support, [1, 2], query, device=CPU, dtype=F64)
    logit = class_logits(many, support, [[1, 2]], query, device=CPU, dtype=F64)[0, 0]
    assert shown == 1 and record["logits"][0, 0] == pytest.approx(float(logit))
    assert record["tc_attention"].shape == (1, 1, 8, 8)
    one = head_of("ta2n", 1).eval()  # rule "one": the clip with the highest 1-shot logit
    record, shown = explain_class(one, support, [0, 1, 2], query, device=CPU, dtype=F64)
    each = class_logits(one, support, [[0], [1], [2]], query, device=CPU, dtype=F64)[0]
    assert shown == int(each.argmax()) and record["logits"][0, 0] == pytest.approx(
        float(each.max()))
