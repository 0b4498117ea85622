"""Heads: shapes and gradients for every head and switch, class-major order, the K-shot
prototypes, ProtoNet and OTAM on sequences with known answers, explain(), checkpoints in this
project's and the authors' formats."""

import itertools
import math
import os

import pytest
import torch

from align.checkpoints import load_head, load_head_checkpoint, save_head
from align.models import HEADS, HeadConfig, build_head, build_head_from_config
from align.models.otam import cumulative_alignment
from align.models.prototypes import ShotAlignment
from align.models.ta2n import TA2NHead
from cache import UserError


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def episode(way=3, shot=1, queries=4, c=16, t=4, h=4, w=4, seed=0, dtype=torch.float32):
    support = rand(way * shot, c, t, h, w, seed=seed, dtype=dtype)
    query = rand(queries, c, t, h, w, seed=seed + 1, dtype=dtype)
    return support, query


def wake_up(head, seed=5):
    """Give the zero-initialised last layers (TTM, SC) weights so every parameter gets a
    gradient and the warps / offsets are not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for seq in (getattr(head.ttm, "locnet", None),
                    getattr(head.sc, "mvnet", None) if head.sc is not None else None):
            if seq is not None:
                seq[-2].weight.copy_(torch.randn(seq[-2].weight.shape, generator=gen,
                                                 dtype=seq[-2].weight.dtype) * 0.5)
    return head


TA2N_SWITCHES = [dict(ttm=a, tc=b, sc=c, sc_mode=mode)
                 for a, b, c in itertools.product([False, True], repeat=3)
                 for mode in (["mask", "grid", "enumerate"] if c else ["mask"])]


# ------------------------------------------------------------------------------ shapes, gradients
def switch_id(s: dict) -> str:
    on = [k for k in ("ttm", "tc", "sc") if s[k]] + ([s["sc_mode"]] if s["sc"] else [])
    return "-".join(on) or "none"


# every switch combination at one shot; the multi-shot path (independent of the switches)
# with a few of them on other sizes
CASES = [(s, 1, (16, 4, 4, 4)) for s in TA2N_SWITCHES] + [
    (s, 2, (12, 5, 5, 5)) for s in TA2N_SWITCHES
    if switch_id(s) in ("none", "ttm-tc-sc-mask", "ttm-tc-sc-grid", "tc-sc-enumerate")]


@pytest.mark.parametrize("switches, shot, size", CASES,
                         ids=[f"{switch_id(s)}-{k}shot" for s, k, _ in CASES])
def test_ta2n_shapes_and_gradients(switches, shot, size):
    c, t, h, w = size
    head = wake_up(build_head("ta2n", channels=c, frames=t, height=h, width=w, shot=shot,
                              **switches)).train()
    support, query = episode(way=3, shot=shot, queries=4, c=c, t=t, h=h, w=w)
    logits = head(support, query, 3, shot)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    params = dict(head.named_parameters())
    weightless = switches["sc_mode"] == "enumerate" or not switches["sc"]  # no offset predictor
    if weightless and not switches["ttm"] and not switches["tc"] and shot == 1:
        assert not params and not head.trainable  # nothing to learn, as in ProtoNet
        return
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    no_grad = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad
    assert head.trainable


@pytest.mark.parametrize("kind", ["protonet", "otam"])
def test_baselines_shapes_and_no_parameters(kind):
    head = build_head(kind, channels=8, frames=5, height=4, width=4, shot=2)
    support, query = episode(way=4, shot=2, queries=3, c=8, t=5)
    logits = head(support, query, 4, 2)
    assert logits.shape == (3, 4) and torch.isfinite(logits).all()
    assert not head.trainable and list(head.parameters()) == []
    assert head.config.kind == kind
    assert head.config.options == {"protonet": {}, "otam": {"lam": 0.1}}[kind]
    with pytest.raises(UserError, match=f"{kind} has no option 'ttm'"):  # TA2N's, not theirs
        build_head(kind, channels=8, ttm=True)


def test_works_for_any_channel_count_and_non_square_maps():
    head = build_head("ta2n", channels=7, frames=5, height=4, width=6, shot=1).train()
    support, query = episode(way=2, queries=3, c=7, t=5, h=4, w=6)
    assert head(support, query, 2, 1).shape == (3, 2)


def test_fast_and_direct_heads_agree_in_value_and_gradient():
    head = wake_up(build_head("ta2n", channels=6, frames=4, height=5, width=4, shot=2))
    head = head.double().train()
    support, query = episode(way=2, shot=2, queries=3, c=6, t=4, h=5, w=4, dtype=torch.float64)
    results = []
    for fast in (False, True):
        head.set_fast(fast)
        logits = head(support, query, 2, 2)
        grads = torch.autograd.grad(logits.pow(2).sum(), list(head.parameters()))
        results.append((logits, grads))
    torch.testing.assert_close(results[1][0], results[0][0])
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------ episode order
@pytest.mark.parametrize("kind", ["ta2n", "protonet", "otam"])
def test_permuting_classes_permutes_logits(kind):
    way, shot = 4, 2
    head = build_head(kind, channels=8, frames=4, height=4, width=4, shot=shot)
    if kind == "ta2n":
        wake_up(head)
    head.eval()
    support, query = episode(way=way, shot=shot, queries=5, c=8)
    perm = torch.tensor([2, 0, 3, 1])
    permuted = support.view(way, shot, *support.shape[1:])[perm].reshape(support.shape)
    torch.testing.assert_close(head(permuted, query, way, shot),
                               head(support, query, way, shot)[:, perm])


def test_forward_episodes_stacks_episodes():
    head = build_head("ta2n", channels=8, frames=4, height=4, width=4).eval()
    s1, q1 = episode(way=2, queries=3, c=8, seed=1)
    s2, q2 = episode(way=2, queries=3, c=8, seed=3)
    out = head.forward_episodes(torch.stack([s1, s2]), torch.stack([q1, q2]), 2, 1)
    torch.testing.assert_close(out, torch.stack([head(s1, q1, 2, 1), head(s2, q2, 2, 1)]))


# ------------------------------------------------------------------------------ K-shot
def test_uniform_attention_prototype_is_the_mean_of_temporal_means():
    shots = ShotAlignment(channels=4)
    with torch.no_grad():  # Wk' = Wq' = 0: uniform attention; Wv' = I
        shots.keynet.weight.zero_()
        shots.querynet.weight.zero_()
        shots.valuenet.weight.copy_(torch.eye(4)[..., None])
    support = rand(6, 4, 5, 3, 3, seed=2)  # 2 classes x 3 shots
    for fast in (False, True):
        shots.fast = fast
        protos, attn = shots(support, 2, 3)
        torch.testing.assert_close(attn, torch.full((2, 3, 5, 5), 0.2))
        expected = support.view(2, 3, 4, 5, 3, 3).mean((1, 3), keepdim=True)[:, 0]
        torch.testing.assert_close(protos, expected.expand(2, 4, 5, 3, 3))


def test_shots_are_aligned_to_the_first_shot():
    c = t = 6
    shots = ShotAlignment(channels=c)
    with torch.no_grad():
        for layer in (shots.keynet, shots.querynet, shots.valuenet):
            layer.weight.copy_(torch.eye(c)[..., None])
    frames = torch.eye(c) * 20  # one-hot frames, sharp attention
    ref = frames  # (C, T): frame t is e_t
    other = frames[:, torch.tensor([3, 4, 5, 0, 1, 2])]  # the same action, out of phase
    support = torch.stack([ref, other])[..., None, None].expand(2, c, t, 2, 2)
    protos, attn = shots(support, 1, 2)
    torch.testing.assert_close(protos[0], ref[..., None, None].expand(c, t, 2, 2), atol=1e-3,
                               rtol=0)


def test_k_shot_queries_pass_through_the_second_value_projection():
    head = build_head("ta2n", channels=4, frames=4, height=4, width=4, shot=2, ttm=False,
                      tc=False, sc=False)
    with torch.no_grad():
        head.shots.valuenet.weight.copy_(2 * torch.eye(4)[..., None])
    support, query = episode(way=2, shot=2, queries=3, c=4)
    out = head.explain(support, query, 2, 2)
    torch.testing.assert_close(out["queries"], 2 * query.mean((-2, -1)).transpose(1, 2))
    one_shot = build_head("ta2n", channels=4, frames=4, height=4, width=4, shot=1, ttm=False,
                          tc=False, sc=False)
    s1, q1 = episode(way=2, shot=1, queries=3, c=4)
    torch.testing.assert_close(one_shot.explain(s1, q1, 2, 1)["prototypes"],
                               s1.mean((-2, -1)).transpose(1, 2))
    with pytest.raises(UserError, match="1-shot"):
        one_shot(support, query, 2, 2)


# ------------------------------------------------------------------------------ baselines
def one_hot_maps(frames_per_video, c=4, hw=4):
    """Maps (n, C, T, H, W) whose frame t is constant e_{index} over H, W."""
    eye = torch.eye(c)
    videos = [torch.stack([eye[i] for i in frames], -1) for frames in frames_per_video]
    return torch.stack(videos)[..., None, None].expand(-1, -1, -1, hw, hw).contiguous()


def test_protonet_known_answers():
    head = build_head("protonet", channels=4, frames=3, height=4, width=4, shot=2)
    # class 0: shots e0 and e1 (prototype (e0 + e1) / 2); class 1: shots e2, e2
    support = one_hot_maps([[0, 0, 0], [1, 1, 1], [2, 2, 2], [2, 2, 2]])
    query = one_hot_maps([[0, 0, 0], [2, 2, 2], [3, 3, 3]])
    logits = head(support, query, 2, 2)
    d = 3 * (1 - 1 / math.sqrt(2))
    expected = -torch.tensor([[d, 3.0], [3.0, 0.0], [3.0, 3.0]])
    torch.testing.assert_close(logits, expected)


def test_otam_cumulative_alignment_hard_limit_by_hand():
    # rows: query [e0 e0 e1 e2], columns: support [e0 e1 e2 e3]; cost 1 - cos
    q, s = [0, 0, 1, 2], [0, 1, 2, 3]
    dist = torch.tensor([[0.0 if a == b else 1.0 for b in s] for a in q])
    # every support frame is matched in order; query frames may be skipped at the ends:
    # e0 e1 e2 match for free, e3 costs 1
    assert cumulative_alignment(dist, lam=1e-3).item() == pytest.approx(1.0, abs=0.01)
    # the other direction: every query frame matched, e0 e0 e1 e2 all found in order
    assert cumulative_alignment(dist.t(), lam=1e-3).item() == pytest.approx(0.0, abs=0.01)


def scalar_otam(dist, lam):
    """The OTAM recursion written out on Python floats (as the official OTAM_cum_dist: down
    moves in the padded columns and the first real column)."""
    rows, cols = len(dist), len(dist[0]) + 2
    d = [[0.0] + list(r) + [0.0] for r in dist]

    def softmin(*xs):
        top = max(-x / lam for x in xs)
        return -lam * (top + math.log(sum(math.exp(-x / lam - top) for x in xs)))

    acc = [[0.0] * cols for _ in range(rows)]
    for j in range(cols):
        acc[0][j] = d[0][j] + (acc[0][j - 1] if j else 0.0)
    for i in range(1, rows):
        acc[i][0] = d[i][0] + acc[i - 1][0]
        for j in range(1, cols):
            options = [acc[i - 1][j - 1], acc[i][j - 1]]
            if j in (1, cols - 1):  # down: the first real column and the last padded one
                options.append(acc[i - 1][j])
            acc[i][j] = d[i][j] + softmin(*options)
    return acc[-1][-1]


def test_otam_matches_the_recursion_written_out():
    dist = rand(2, 3, 5, 5, seed=4, dtype=torch.float64).abs()
    out = cumulative_alignment(dist, lam=0.1)
    for i, j in itertools.product(range(2), range(3)):
        assert out[i, j].item() == pytest.approx(scalar_otam(dist[i, j].tolist(), 0.1), abs=1e-9)


def test_otam_prefers_the_ordered_match_where_protonet_ties():
    support = one_hot_maps([[0, 1, 2, 3], [3, 2, 1, 0]])  # class 0 in order, class 1 reversed
    query = one_hot_maps([[0, 0, 1, 2]])  # class 0, slower and cut short
    proto = build_head("protonet", channels=4, frames=4, height=4, width=4)(support, query, 2, 1)
    assert proto[0, 0].item() == pytest.approx(proto[0, 1].item())  # both 3 frames off
    otam = build_head("otam", channels=4, frames=4, height=4, width=4)(support, query, 2, 1)
    assert otam[0, 0] > otam[0, 1] + 0.5
    assert otam[0, 0].item() == pytest.approx(-1.0, abs=0.3)  # soft-min of the by-hand 1 + 0


# ------------------------------------------------------------------------------ explain
def test_explain_returns_the_documented_intermediates():
    head = wake_up(build_head("ta2n", channels=8, frames=5, height=4, width=4, shot=2)).train()
    support, query = episode(way=3, shot=2, queries=4, c=8, t=5)
    out = head.explain(support, query, 3, 2)
    assert head.training  # restored
    shapes = {"ttm_support": (6, 2), "ttm_query": (4, 2), "shot_attention": (3, 2, 5, 5),
              "prototypes": (3, 5, 8), "queries": (4, 5, 8), "tc_attention": (3, 4, 5, 5),
              "sc_offsets": (3, 4, 5, 2), "f_s": (3, 4, 5, 8), "f_q": (3, 4, 5, 8),
              "distances": (3, 4), "logits": (4, 3)}
    assert {k: tuple(v.shape) for k, v in out.items()} == shapes
    head.eval()
    torch.testing.assert_close(out["logits"], head(support, query, 3, 2))
    assert not any(v.requires_grad for v in out.values())
    bare = build_head("ta2n", channels=8, frames=5, height=4, width=4, ttm=False, sc=False)
    keys = set(bare.explain(*episode(way=3, c=8, t=5), 3, 1))
    assert keys == {"prototypes", "queries", "tc_attention", "f_s", "f_q", "distances", "logits"}


# ------------------------------------------------------------------------------ building
def test_build_errors_are_user_errors():
    with pytest.raises(UserError, match="unknown head"):
        build_head("tsn", channels=8)
    with pytest.raises(UserError, match="ta2n has no option 'tcc'; its options: fast, sc, "
                                        "sc_mode, tc, ttm"):
        build_head("ta2n", channels=8, tcc=True)
    with pytest.raises(UserError, match="sc_mode' must be one of mask, grid, enumerate"):
        build_head("ta2n", channels=8, sc_mode="roll")
    head = build_head("ta2n", channels=8, frames=4, height=4, width=4)
    with pytest.raises(UserError, match="C=8"):
        head(*episode(way=2, c=16), 2, 1)


def test_same_seed_same_weights_and_config_round_trip():
    a = build_head("ta2n", channels=8, shot=2, seed=3)
    b = build_head_from_config(HeadConfig.from_dict(vars(a.config)), seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    c = build_head("ta2n", channels=8, shot=2, seed=4)
    assert not torch.equal(a.tc.keynet.weight, c.tc.keynet.weight)
    assert set(HEADS) == {"ta2n", "protonet", "otam", "trn", "tarn", "cmn", "arn", "trx"}


# ------------------------------------------------------------------------------ checkpoints
def trained_looking(head, support, query, way, shot, steps=2):
    """Non-trivial weights and BatchNorm running statistics."""
    wake_up(head).train()
    for _ in range(steps):
        head(support, query, way, shot)
    head.decay()
    return head.eval()


def test_save_and_load_round_trip(tmp_path):
    support, query = episode(way=3, shot=2, queries=4, c=8, t=5)
    head = trained_looking(build_head("ta2n", channels=8, frames=5, height=4, width=4, shot=2,
                                      sc_mode="grid"), support, query, 3, 2)
    path = tmp_path / "head.pt"
    save_head(head, path, extra={"epoch": 7})
    assert os.listdir(tmp_path) == ["head.pt"]  # no temp file left behind
    loaded, extra = load_head_checkpoint(path)
    assert extra == {"epoch": 7} and loaded.config == head.config and not loaded.training
    assert loaded.sc.delta.item() == pytest.approx(0.1)
    torch.testing.assert_close(loaded(support, query, 3, 2), head(support, query, 3, 2))
    for kind in ("protonet", "otam"):
        save_head(build_head(kind, channels=8, shot=2), tmp_path / f"{kind}.pt")
        assert load_head(tmp_path / f"{kind}.pt").config.kind == kind
    # overrides: a 2-shot head also serves 1-shot episodes; a 1-shot one has no 2-shot weights
    assert load_head(path, shot=1).shots is None
    save_head(build_head("ta2n", channels=8, shot=1), tmp_path / "one.pt")
    with pytest.raises(UserError, match="this checkpoint is 1-shot .*use --shots 1"):
        load_head(tmp_path / "one.pt", shot=2)


def authors_state_dict(head, prefix="align.", linear_indices=(10, 12)):
    """The head's weights under the authors' key names (firststage / secondstage / *_multi)."""
    state = {}

    def sequential(seq, name, indices):
        holders = [i for i, layer in enumerate(seq) if layer.state_dict()]
        for mine, theirs in zip(holders, indices):
            for param, value in seq[mine].state_dict().items():
                state[f"{prefix}{name}.{theirs}.{param}"] = value.clone()

    sequential(head.ttm.locnet, "firststage.locnet", (0, 1, 4, 5, *linear_indices))
    sequential(head.sc.mvnet, "secondstage.mvnet", (0, 1, 4, 5, *linear_indices))
    for name in ("keynet", "querynet", "valuenet"):
        state[f"{prefix}secondstage.{name}.weight"] = getattr(head.tc, name).weight.clone()
        source = head.shots if head.shots is not None else head.tc  # authors always have *_multi
        state[f"{prefix}{name}_multi.weight"] = getattr(source, name).weight.clone()
    state["resnet.conv1.weight"] = torch.zeros(4, 3, 7, 7)  # the backbone: not the head's
    return state


@pytest.mark.parametrize("variant", ["checkpoint", "module-prefix", "bare", "issue-numbering"])
def test_authors_checkpoint_round_trip(tmp_path, variant):
    way, shot, t = 3, 2, 5
    support, query = episode(way=way, shot=shot, queries=4, c=8, t=t)
    head = trained_looking(build_head("ta2n", channels=8, frames=t, height=4, width=4,
                                      shot=shot), support, query, way, shot)
    if variant == "issue-numbering":  # layers numbered without Flatten: Linear at 9 and 11
        state = authors_state_dict(head, linear_indices=(9, 11))
    elif variant == "module-prefix":
        state = authors_state_dict(head, prefix="module.align.")
    else:
        state = authors_state_dict(head)
    ckpt = state if variant == "bare" else {"iteration": 10, "model_state_dict": state,
                                            "optimizer_state_dict": {"state": {}}}
    path = tmp_path / "checkpoint_best.pt"
    torch.save(ckpt, path)
    loaded = load_head(path, frames=t, shot=shot, height=4, width=4)
    assert loaded.config == HeadConfig(channels=8, frames=t, height=4, width=4, shot=shot,
                                       options=TA2NHead.default_options())
    # the authors' files do not hold SC's perturbation step; evaluation does not use it
    torch.testing.assert_close(loaded(support, query, way, shot), head(support, query, way, shot))
    running = loaded.ttm.locnet[1].running_mean
    assert torch.equal(running, head.ttm.locnet[1].running_mean) and running.abs().sum() > 0


def test_authors_one_shot_checkpoint_and_defaults(tmp_path):
    support, query = episode(way=2, shot=1, queries=3, c=8, t=8, h=7, w=7)
    head = trained_looking(build_head("ta2n", channels=8, frames=8, height=7, width=7),
                           support, query, 2, 1)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model_state_dict": authors_state_dict(head)}, path)
    loaded, extra = load_head_checkpoint(path)
    assert (loaded.config.frames, loaded.config.shot, loaded.config.height) == (8, 1, 7)
    assert extra == {"source": "authors"} and loaded.shots is None
    torch.testing.assert_close(loaded(support, query, 2, 1), head(support, query, 2, 1))
    torch.save({"model_state_dict": {"resnet.fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(UserError, match="align"):
        load_head(path)
    with pytest.raises(UserError, match="no such"):
        load_head(tmp_path / "missing.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="readable"):
        load_head(tmp_path / "notes.pt")
