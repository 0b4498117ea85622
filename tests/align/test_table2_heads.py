"""Table 2's competing heads (TRN++, TARN, CMN, ARN, TRX): shapes and gradients, episode
symmetries, options and checkpoints, and each method's computation against a loop written out
from its paper / reference code (float64)."""

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F

from align.checkpoints import load_head, save_head
from align.evaluate import EvalConfig, evaluate
from align.models import HEADS, HeadConfig, build_head, build_head_from_config
from align.models.arn import second_order
from align.models.cmn import write_memory
from align.models.trn import relation_tuples
from align.models.trx import positional_encoding
from align.recipes import TrainConfig
from align.train import train
from cache import FeatureCache, UserError
from cache.synthetic import SynthConfig, generate_synthetic

CPU = torch.device("cpu")
TABLE2 = ["trn", "tarn", "cmn", "arn", "trx"]
# small widths keep every test fast; each is a real option of the head
SMALL = {"trn": dict(dim=12, bottleneck=10, frame_dim=6), "tarn": dict(hidden=6),
         "cmn": dict(dim=10, saliency=3), "arn": dict(dim=16, hidden=4), "trx": dict(dim=12)}


def assert_same_values_and_gradients(head, fast, direct):
    """``fast`` and ``direct`` (tensors computed from ``head``'s parameters) agree, and so do
    the gradients of a non-trivial function of them."""
    torch.testing.assert_close(fast, direct)
    params = [p for p in head.parameters() if p.requires_grad]
    weights = rand(*fast.shape, seed=11, dtype=fast.dtype)
    grads = [torch.autograd.grad((weights * out).sum(), params, allow_unused=True)
             for out in (fast, direct)]
    for name, a, b in zip([n for n, p in head.named_parameters() if p.requires_grad], *grads):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def episode(way=3, shot=1, queries=4, c=8, t=5, h=4, w=4, seed=0, dtype=torch.float32):
    return (rand(way * shot, c, t, h, w, seed=seed, dtype=dtype),
            rand(queries, c, t, h, w, seed=seed + 1, dtype=dtype))


def small(kind, c=8, t=5, h=4, w=4, shot=1, seed=0, **options):
    return build_head(kind, channels=c, frames=t, height=h, width=w, shot=shot, seed=seed,
                      options={**SMALL[kind], **options})


# ------------------------------------------------------------------------------ shapes, gradients
# Biases whose gradient is zero by construction, as in the methods' own code: a bias added to
# every class's logit (softmax ignores it), one that reaches query and prototype alike (TRN++'s
# embedding; TRX's values, whose attention weights sum to 1), one that feeds a BatchNorm
# (training mode subtracts the batch mean).
CANCELLING = {"trn": r"fusion\.\d+\.3\.bias", "tarn": r"score\.bias", "cmn": r"$^",
              "arn": r"(encoder\.[03]|attention\.body\.[03]|relation\.layer\d\.0)\.bias"
                     r"|relation\.fc2\.bias",
              "trx": r"cross\.\d+\.v_linear\.bias"}


@pytest.mark.parametrize("shot", [1, 2])
@pytest.mark.parametrize("kind", TABLE2)
def test_shapes_and_every_parameter_gets_a_gradient(kind, shot):
    head = small(kind, shot=shot).double().train()
    support, query = episode(way=3, shot=shot, queries=4, dtype=torch.float64)
    logits = head(support, query, 3, shot)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    grads = {n: p.grad.abs().max().item() for n, p in head.named_parameters()}
    zero = {n for n in grads if re.fullmatch(CANCELLING[kind], n)}
    assert all(grads[n] < 1e-12 for n in zero), {n: grads[n] for n in zero}
    assert all(g > 1e-9 for n, g in grads.items() if n not in zero), grads
    assert len(zero) < len(grads) and head.trainable and not head.training_free
    assert head.config.kind == kind and "ttm" not in head.config.options


@pytest.mark.parametrize("kind", TABLE2)
def test_any_channels_and_non_square_maps(kind):
    head = small(kind, c=5, t=4, h=3, w=6).train()
    support, query = episode(way=2, queries=3, c=5, t=4, h=3, w=6)
    assert head(support, query, 2, 1).shape == (3, 2)


# ------------------------------------------------------------------------------ symmetries
@pytest.mark.parametrize("kind", TABLE2)
def test_permuting_classes_permutes_logits_and_queries_are_independent(kind):
    way, shot = 4, 2
    head = small(kind, shot=shot).eval()
    support, query = episode(way=way, shot=shot, queries=5)
    perm = torch.tensor([2, 0, 3, 1])
    permuted = support.view(way, shot, *support.shape[1:])[perm].reshape(support.shape)
    logits = head(support, query, way, shot)
    torch.testing.assert_close(head(permuted, query, way, shot), logits[:, perm])
    # in eval mode a query's logits do not depend on the other queries of the episode
    torch.testing.assert_close(head(support, query[2:4], way, shot), logits[2:4])


@pytest.mark.parametrize("kind", TABLE2)
def test_swapping_two_shots_of_a_class_changes_nothing(kind):
    head = small(kind, shot=2).eval()
    support, query = episode(way=3, shot=2, queries=4)
    swapped = support.view(3, 2, *support.shape[1:]).flip(1).reshape(support.shape)
    torch.testing.assert_close(head(swapped, query, 3, 2), head(support, query, 3, 2))


def test_forward_episodes_stacks_episodes():
    head = small("trx").eval()
    (s1, q1), (s2, q2) = episode(seed=1), episode(seed=3)
    out = head.forward_episodes(torch.stack([s1, s2]), torch.stack([q1, q2]), 3, 1)
    torch.testing.assert_close(out, torch.stack([head(s1, q1, 3, 1), head(s2, q2, 3, 1)]))


# ------------------------------------------------------------------------------ options, errors
def test_options_are_recorded_and_round_trip():
    head = build_head("trx", channels=8, frames=5, height=4, width=4, options={"sets": [3, 1]})
    # resolved and sorted
    assert head.config.options == {"dim": 1152, "sets": [1, 3], "combine": "mean"}
    again = build_head_from_config(HeadConfig.from_dict(vars(head.config)))
    assert again.config == head.config
    for kind in TABLE2:  # every default is written down
        cfg = build_head(kind, channels=8, frames=5, height=4, width=4).config
        assert set(cfg.options) == {o.name for o in HEADS[kind].OPTIONS}, kind
    a, b, c = (small("tarn", seed=s) for s in (3, 3, 4))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.align.weight, c.align.weight)


def test_option_and_size_errors_are_user_errors():
    with pytest.raises(UserError, match="trx has no option 'width'; its options: combine, "
                                        "dim, sets"):
        build_head("trx", channels=8, options={"width": 3})
    with pytest.raises(UserError, match="mapping"):
        build_head_from_config(HeadConfig(kind="trx", channels=8, options=[2, 3]))
    with pytest.raises(UserError, match="protonet has no option 'dim'; its options: none"):
        build_head("protonet", channels=8, options={"dim": 3})
    with pytest.raises(UserError, match="sets"):
        build_head("trx", channels=8, options={"sets": []})
    with pytest.raises(UserError, match="dim"):
        build_head("arn", channels=8, options={"dim": 8})  # the relation net pools 4 times
    with pytest.raises(UserError, match="scale"):
        build_head("cmn", channels=8, options={"scale": 0})
    with pytest.raises(UserError, match="T >= 2"):
        build_head("trn", channels=8, frames=1)
    with pytest.raises(UserError, match="T >= 3"):
        small("trx", t=2)(*episode(t=2), 3, 1)
    with pytest.raises(UserError, match="T=5"):
        small("trn", t=5)(*episode(t=6), 3, 1)  # one relation MLP per scale 2..T
    with pytest.raises(UserError, match="C=8"):
        small("cmn")(*episode(c=6), 3, 1)


@pytest.mark.parametrize("kind", TABLE2)
def test_checkpoint_round_trip(kind, tmp_path):
    support, query = episode(way=3, shot=2, queries=4)
    head = small(kind, shot=2).train()
    head(support, query, 3, 2)  # BatchNorm statistics move
    head.eval()
    save_head(head, tmp_path / "head.pt", extra={"epoch": 1})
    loaded = load_head(tmp_path / "head.pt")
    assert loaded.config == head.config
    torch.testing.assert_close(loaded(support, query, 3, 2), head(support, query, 3, 2))
    one_shot = load_head(tmp_path / "head.pt", shot=1)  # nothing of these heads depends on K
    torch.testing.assert_close(one_shot(support[::2], query, 3, 1), head(support[::2], query, 3, 1))


@pytest.mark.parametrize("kind", TABLE2)
def test_explain_reports_logits_in_eval_mode_and_restores_training(kind):
    head = small(kind, shot=2).train()
    support, query = episode(way=3, shot=2, queries=4)
    out = head.explain(support, query, 3, 2)
    assert head.training
    head.eval()
    torch.testing.assert_close(out["logits"], head(support, query, 3, 2))
    torch.testing.assert_close(out["distances"], -out["logits"].t())
    assert not any(v.requires_grad for v in out.values())


# ------------------------------------------------------------------------------ TRX
def trx_reference(cross, support, labels, query, way):
    """One cardinality of TRX written out as in the official TemporalCrossTransformer: tuples of
    positionally encoded frames, then a loop over classes and over queries."""
    n_s, t, c = support.shape
    pe = positional_encoding(t, c, support.dtype)
    support, query = support + pe, query + pe
    combos = list(itertools.combinations(range(t), cross.size))

    def tuples(x):
        return torch.stack([torch.cat([x[:, i] for i in combo], -1) for combo in combos], 1)

    s, q = tuples(support), tuples(query)  # (S, P, omega*C), (M, P, omega*C)
    s_k, q_k = cross.norm_k(cross.k_linear(s)), cross.norm_k(cross.k_linear(q))
    s_v, q_v = cross.v_linear(s), cross.v_linear(q)
    out = torch.zeros(query.shape[0], way, dtype=support.dtype)
    for cls in range(way):
        rows = (labels == cls).nonzero()[:, 0]
        k, v = s_k[rows], s_v[rows]  # (K, P, D)
        for m in range(query.shape[0]):
            scores = torch.einsum("pd,ksd->pks", q_k[m], k) / math.sqrt(cross.dim)
            attn = scores.reshape(len(combos), -1).softmax(-1).view_as(scores)
            proto = torch.einsum("pks,ksd->pd", attn, v)
            out[m, cls] = -((q_v[m] - proto) ** 2).sum() / len(combos)
    return out


def test_trx_matches_the_official_computation_written_out():
    way, shot, t = 3, 2, 5
    head = build_head("trx", channels=6, frames=t, height=3, width=3, shot=shot,
                      options={"dim": 7, "sets": [1, 2, 3]}).double().eval()
    support, query = episode(way=way, shot=shot, queries=4, c=6, t=t, h=3, w=3,
                             dtype=torch.float64)
    labels = torch.arange(way).repeat_interleave(shot)
    s, q = support.mean((-2, -1)).transpose(1, 2), query.mean((-2, -1)).transpose(1, 2)
    per_set = torch.stack([trx_reference(x, s, labels, q, way) for x in head.cross], -1)
    assert_same_values_and_gradients(head, head(support, query, way, shot), per_set.mean(-1))


def test_positional_encoding_is_trx_sinusoid():
    pe = positional_encoding(6, 5)  # odd C: 3 sine and 2 cosine channels
    position = torch.arange(6.0)[:, None]
    div = torch.exp(torch.arange(0, 5, 2) * -(math.log(10000.0) / 5))
    torch.testing.assert_close(pe[:, 0::2], 0.1 * torch.sin(position * div))
    torch.testing.assert_close(pe[:, 1::2], 0.1 * torch.cos(position * div[:2]))


def test_trx_attention_is_a_distribution_over_the_class_tuples():
    head = small("trx", shot=3).eval()
    out = head.explain(*episode(way=2, shot=3, queries=2), 2, 3)
    attn = out["attention_2"]  # (M, N, P, K, P), P = 10 pairs of 5 frames
    assert attn.shape == (2, 2, 10, 3, 10)
    torch.testing.assert_close(attn.sum((-2, -1)), torch.ones(2, 2, 10))


# ------------------------------------------------------------------------------ TRN++
def test_trn_tuples_per_scale():
    assert relation_tuples(8, 8, 3) == [tuple(range(8))]  # the scale T: one tuple
    assert relation_tuples(8, 3, 3) == [(0, 1, 2), (1, 3, 6), (5, 6, 7)]  # #0, #28, #55 of 56
    assert relation_tuples(4, 2, 0) == list(itertools.combinations(range(4), 2))
    assert len(relation_tuples(4, 3, 10)) == 4  # fewer than asked: all


def test_trn_embedding_matches_the_tuple_loop():
    head = small("trn", t=5, tuples=2).double()
    maps = rand(3, 8, 5, 4, 4, seed=6, dtype=torch.float64)
    frames = head.frame_fc(maps.mean((-2, -1)).transpose(1, 2))  # (n, T, F)
    expected = 0
    for scale, mlp in zip(range(5, 1, -1), head.fusion):
        for combo in relation_tuples(5, scale, 2):
            expected = expected + mlp(frames[:, list(combo)].reshape(3, -1))
    assert_same_values_and_gradients(head, head.embed(maps), expected)


def test_trn_scores_minus_squared_distance_to_mean_embedding():
    head = small("trn", shot=2).double()
    support, query = episode(way=2, shot=2, queries=3, dtype=torch.float64)
    s, q = head.embed(support), head.embed(query)
    protos = torch.stack([s[:2].mean(0), s[2:].mean(0)])
    expected = -torch.cdist(q, protos) ** 2
    assert_same_values_and_gradients(head, head(support, query, 2, 2), expected)


# ------------------------------------------------------------------------------ TARN
COMPARISONS = {"mult": lambda q, h: q * h, "subt": lambda q, h: q - h,
               "euccos": lambda q, h: torch.stack([F.cosine_similarity(q, h, dim=-1, eps=1e-6),
                                                   (q - h).norm(dim=-1)], -1)}


@pytest.mark.parametrize("compare", list(COMPARISONS))
def test_tarn_matches_the_pairwise_computation_written_out(compare):
    head = small("tarn", shot=2, compare=compare).double()
    support, query = episode(way=2, shot=2, queries=3, dtype=torch.float64)
    s = head.encoder(support.mean((-2, -1)).transpose(1, 2))[0]  # (S, T, 2h)
    q = head.encoder(query.mean((-2, -1)).transpose(1, 2))[0]  # (M, T, 2h)
    rel = torch.zeros(3, 4, dtype=torch.float64)
    for m, j in itertools.product(range(3), range(4)):
        scores = head.align(s[j]) @ q[m].t()  # (Ts, Tq)
        aligned = scores.softmax(0).t() @ s[j]  # (Tq, 2h): each query segment over support
        hidden = head.measure(COMPARISONS[compare](q[m], aligned)[None])[1][0, 0]
        rel[m, j] = head.score(hidden)[0]
    assert_same_values_and_gradients(head, head(support, query, 2, 2),
                                     rel.view(3, 2, 2).mean(-1))


def test_tarn_without_alignment_weights_attends_uniformly():
    head = small("tarn")
    with torch.no_grad():
        head.align.weight.zero_()
    out = head.explain(*episode(way=2, queries=3), 2, 1)
    torch.testing.assert_close(out["attention"], torch.full((3, 2, 5, 5), 0.2))


# ------------------------------------------------------------------------------ CMN
def test_cmn_memory_write_updates_the_class_slot_in_order():
    keys = F.normalize(rand(2, 3, 4, seed=8, dtype=torch.float64), dim=-1)  # 2 classes, 3 shots
    slot = write_memory(keys)
    for n in range(2):
        k = keys[n, 0]
        for shot in (1, 2):
            k = (k + keys[n, shot]) / (k + keys[n, shot]).norm()
        torch.testing.assert_close(slot[n], k)
    torch.testing.assert_close(write_memory(keys[:, :2]), F.normalize(keys[:, 0] + keys[:, 1]))
    torch.testing.assert_close(write_memory(keys[:, :1]), keys[:, 0])


def test_cmn_does_not_see_the_order_of_frames():
    """The multi-saliency embedding sums over frames: reversing or shuffling a video's frames
    leaves every logit unchanged (why CMN-J stays at chance on classes defined by order)."""
    head = small("cmn").double().eval()
    support, query = episode(way=3, queries=4, dtype=torch.float64)
    perm = torch.tensor([3, 0, 4, 1, 2])
    logits = head(support, query, 3, 1)
    torch.testing.assert_close(head(support[:, :, perm], query.flip(2), 3, 1), logits)
    assert not torch.allclose(small("tarn").double()(support, query.flip(2), 3, 1),
                              small("tarn").double()(support, query, 3, 1))


def test_cmn_known_answers():
    head = small("cmn", scale=4.0).double()
    support, query = episode(way=3, queries=2, dtype=torch.float64)
    query = torch.cat([support[1:2], query])  # query 0 is support video 1
    sim = head.explain(support, query, 3, 1)["similarity"]
    assert sim[0, 1].item() == pytest.approx(1.0) and sim[0].argmax() == 1
    torch.testing.assert_close(head(support, query, 3, 1), 4.0 * sim)
    # no saliency weights: uniform attention, every descriptor is the mean projected frame
    with torch.no_grad():
        head.hidden.zero_()
    mean = head.project(query.mean((-2, -1)).transpose(1, 2)).mean(1)  # (M, dim)
    proto = head.project(support.mean((-2, -1)).transpose(1, 2)).mean(1)  # (N, dim)
    expected = F.normalize(mean, dim=-1) @ F.normalize(proto, dim=-1).t()
    torch.testing.assert_close(head.explain(support, query, 3, 1)["similarity"], expected)


# ------------------------------------------------------------------------------ ARN
def test_arn_second_order_pooling_matches_the_official_loop():
    features = rand(3, 5, 2, 3, 3, seed=9, dtype=torch.float64).relu()
    expected = []
    for x in features:  # eval_arn.py, one video at a time
        s = x.reshape(5, -1)
        s = s @ s.t() / s.shape[1]
        expected.append(2 * torch.sigmoid(100 * s / s.trace()) - 1)
    torch.testing.assert_close(second_order(features), torch.stack(expected))


def test_arn_pooling_is_invariant_to_permuting_positions():
    features = rand(2, 4, 3, 3, 3, seed=10, dtype=torch.float64)
    perm = torch.randperm(27, generator=torch.Generator().manual_seed(0))
    shuffled = features.flatten(2)[..., perm].view_as(features)
    torch.testing.assert_close(second_order(shuffled), second_order(features))
    assert second_order(torch.zeros(1, 4, 2, 2, 2)).abs().max() == 0  # finite at zero


def test_arn_pairs_support_then_query_and_averages_shot_matrices():
    head = small("arn", shot=2).double().eval()
    support, query = episode(way=2, shot=2, queries=3, dtype=torch.float64)
    s = head.pooled(support)[0]
    q = head.pooled(query)[0]
    protos = s.view(2, 2, 16, 16).mean(1)
    pairs = torch.stack([torch.stack([protos[n], q[m]]) for m in range(3) for n in range(2)])
    assert_same_values_and_gradients(head, head(support, query, 2, 2),
                                     head.relation(pairs).view(3, 2))
    mask = head.explain(support, query, 2, 2)["mask_query"]
    assert mask.shape == (3, 4, 4) and ((mask > 0) & (mask < 1)).all()


# ------------------------------------------------------------------------------ training
# TARN's two GRUs get more episodes than the other heads at this tiny size; ARN's relation
# network is the slowest head on a CPU, so it trains on fewer queries per episode.
TRAIN_SETTINGS = {"tarn": dict(episodes_per_epoch=150), "arn": dict(queries=1)}  # Adam 1e-3 (fast)


@pytest.mark.slow
@pytest.mark.parametrize("kind", TABLE2)
def test_training_through_train_heads_beats_chance(kind, tmp_path, monkeypatch):
    """Each head, trained by the real loop (train-heads) with default options for a few hundred
    episodes on a small synthetic cache, scores clearly above chance (20%) on 200 test
    episodes."""
    monkeypatch.chdir(tmp_path)  # runs/latest.json lands in the test's folder
    cache_path = str(tmp_path / "synth.zarr")
    generate_synthetic(cache_path, SynthConfig(channels=16, frames=8, size=4, train_classes=16,
                                               val_classes=5, test_classes=8,
                                               videos_per_class=8, seed=0), progress=False)
    settings = {"queries": 2, "episodes_per_epoch": 60, **TRAIN_SETTINGS.get(kind, {})}
    cfg = TrainConfig(cache=cache_path, head=kind, out=str(tmp_path / "run"), shot=1, epochs=2,
                      val_episodes=0, **settings)
    train(cfg, device=CPU, progress=False, log=lambda message: None)
    with FeatureCache.open(cache_path) as cache:
        result = evaluate(load_head(tmp_path / "run" / "best.pt"), cache,
                          EvalConfig(episodes=200, shot=1), device=CPU, progress=False)
    assert result["accuracy"] > 30, result["summary"]
