"""Table 2's heads against their official code, transcribed: each ``official_*`` function below
repeats the arithmetic of the named file and lines of the commit we read (the statements in
their order, PyTorch calls as there; einops' ``rearrange`` written as reshape / permute), fed
with our head's own weights - the official weights copied into ours - and the same frame
features on both sides. Compared in float64, values and gradients, 5-way 1- and 5-shot.

Read (github.com, through this project's code-search index):
- tobyperrett/few-shot-action-recognition, model.py at 3687f3a (PositionalEncoding lines 80-98,
  TemporalCrossTransformer 102-194, CNN_TRX 197-219, OTAM_cum_dist 236-266, CNN_OTAM 268-296) and
  utils.py at 0b5b5b8 (cos_sim lines 8-17);
- tobyperrett/trx, model.py at ef0d9b0 ("changed norm to mean when combining trxs in model";
  CNN_TRX.forward: ``torch.mean(sample_logits, dim=[-1])``) and at db3f17b (the first release:
  ``torch.norm(sample_logits, dim=[-1]) * -1``);
- zhoubolei/TRN-pytorch, TRNmodule.py at 5c5ecf8 (RelationModuleMultiScale.forward);
- HongguangZhang/arn-eccv20-master, src/models.py and eval_arn.py at c682474
  (SimilarityNetwork.forward; the second-order pooling, prototype and pair loop of main());
- Seleucia/TARN (unofficial; the authors released none), tarn.py at 33e46c2
  (TARN.align_and_computelogits with sim_type 'Mult').

Deviations, each named where the head's docstring lists it: TRN's random choice of 3 tuples per
scale in every forward pass (np.random.choice) is a fixed even spread here, so the reference is
fed our picks; TARN's softmax runs over the support segments here (theirs over the query axis,
and their bias b then cancels), so the reference takes the axis as an argument and is checked
with the official axis too, to show the deviation is real; ARN's spatial detector pools time
between its two convolutions (defined for their T only) and initialises Linear biases to 1 -
neither is compared; CMN-J has no public code. Dtypes: their positional encoding and OTAM's
cumulative matrix are always float32; the transcriptions build them in the input's dtype.
"""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from align.checkpoints import CHECKPOINT_FORMAT, load_head, save_head
from align.models import build_head
from align.models.otam import cumulative_alignment
from align.models.trn import relation_tuples
from cache import UserError

WAY = 5
F64 = torch.float64


def rand(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def episode(shot, queries=6, c=8, t=5, h=3, w=3, seed=0):
    """Float64 maps (class-major support) that need gradients."""
    support = rand(WAY * shot, c, t, h, w, seed=seed).requires_grad_()
    query = rand(queries, c, t, h, w, seed=seed + 1).requires_grad_()
    return support, query


def frame_features(maps):
    return maps.mean((-2, -1)).transpose(1, 2)  # (n, T, C): the backbone's average pool


def interleaved(support_features, shot):
    """Class-major support (ours) in their test script's order, labels [0..N-1] * K."""
    order = torch.arange(WAY * shot).view(WAY, shot).t().reshape(-1)  # shot-major
    return support_features[order], torch.arange(WAY).repeat(shot)


def assert_equal_values_and_gradients(ours, theirs, inputs):
    """Same values, and the same gradients of a fixed random weighting of them with respect to
    ``inputs`` (maps and, for heads with weights, every parameter)."""
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    weights = rand(*ours.shape, seed=99)
    grads = [torch.autograd.grad((weights * out).sum(), inputs, allow_unused=True,
                                 retain_graph=True) for out in (ours, theirs)]
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def extract_class_indices(labels, which_class):
    """utils.py, 0b5b5b8."""
    class_mask = torch.eq(labels, which_class)
    class_mask_indices = torch.nonzero(class_mask, as_tuple=False)
    return torch.reshape(class_mask_indices, (-1,))


# ------------------------------------------------------------------------------ TRX
def official_positional_encoding(d_model, max_len, dtype, pe_scale_factor=0.1):
    """PositionalEncoding.__init__ (model.py lines 84-95), in ``dtype`` (theirs: float32)."""
    pe = torch.zeros(max_len, d_model, dtype=dtype)
    position = torch.arange(0, max_len, dtype=dtype).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=dtype) * -(math.log(10000.0) / d_model))
    pe[:, 0::2] = torch.sin(position * div_term) * pe_scale_factor
    pe[:, 1::2] = torch.cos(position * div_term) * pe_scale_factor
    return pe.unsqueeze(0)


def official_temporal_cross_transformer(cross, support_set, support_labels, queries, way):
    """TemporalCrossTransformer.forward (model.py lines 130-194) in eval mode (dropout off),
    with ``cross``'s k_linear, v_linear and norm_k as its weights."""
    seq_len, d_model = support_set.shape[1:]
    tuples = [torch.tensor(comb) for comb in itertools.combinations(range(seq_len), cross.size)]
    tuples_len = len(tuples)
    pe = official_positional_encoding(d_model, int(seq_len * 1.5), support_set.dtype)
    n_queries = queries.shape[0]
    n_support = support_set.shape[0]
    support_set = support_set + pe[:, :support_set.size(1)]
    queries = queries + pe[:, :queries.size(1)]
    s = [torch.index_select(support_set, -2, p).reshape(n_support, -1) for p in tuples]
    q = [torch.index_select(queries, -2, p).reshape(n_queries, -1) for p in tuples]
    support_set = torch.stack(s, dim=-2)
    queries = torch.stack(q, dim=-2)
    support_set_ks = cross.k_linear(support_set)
    queries_ks = cross.k_linear(queries)
    support_set_vs = cross.v_linear(support_set)
    queries_vs = cross.v_linear(queries)
    mh_support_set_ks = cross.norm_k(support_set_ks)
    mh_queries_ks = cross.norm_k(queries_ks)
    mh_support_set_vs = support_set_vs
    mh_queries_vs = queries_vs
    unique_labels = torch.unique(support_labels)
    all_distances_tensor = torch.zeros(n_queries, way, dtype=queries.dtype)
    for c in unique_labels:
        class_k = torch.index_select(mh_support_set_ks, 0, extract_class_indices(support_labels, c))
        class_v = torch.index_select(mh_support_set_vs, 0, extract_class_indices(support_labels, c))
        class_scores = torch.matmul(mh_queries_ks.unsqueeze(1), class_k.transpose(-2, -1)) \
            / math.sqrt(cross.dim)
        class_scores = class_scores.permute(0, 2, 1, 3)
        class_scores = class_scores.reshape(n_queries, tuples_len, -1)
        class_scores = [torch.softmax(class_scores[i], dim=1) for i in range(n_queries)]
        class_scores = torch.cat(class_scores)
        class_scores = class_scores.reshape(n_queries, tuples_len, -1, tuples_len)
        class_scores = class_scores.permute(0, 2, 1, 3)
        query_prototype = torch.matmul(class_scores, class_v)
        query_prototype = torch.sum(query_prototype, dim=1)
        diff = mh_queries_vs - query_prototype
        norm_sq = torch.norm(diff, dim=[-2, -1]) ** 2
        distance = torch.div(norm_sq, tuples_len)
        distance = distance * -1
        all_distances_tensor[:, c.long()] = distance
    return all_distances_tensor


def official_cnn_trx(head, support_features, support_labels, target_features, first_release):
    """CNN_TRX.forward after get_feats: model.py lines 210-216 (3687f3a; = tobyperrett/trx at
    ef0d9b0), or the first release's norm (tobyperrett/trx at db3f17b)."""
    all_logits = [official_temporal_cross_transformer(t, support_features, support_labels,
                                                      target_features, WAY)
                  for t in head.cross]
    all_logits = torch.stack(all_logits, dim=-1)
    if first_release:
        return torch.norm(all_logits, dim=[-1]) * -1
    return torch.mean(all_logits, dim=[-1])


@pytest.mark.parametrize("shot", [1, 5])
def test_trx_equals_the_official_cnn_trx(shot):
    head = build_head("trx", channels=8, frames=5, height=3, width=3, shot=shot,
                      options={"dim": 12}).double().eval()
    assert head.config.options["combine"] == "mean"  # the official rule is the default
    support, query = episode(shot)
    s, labels = interleaved(frame_features(support), shot)
    theirs = official_cnn_trx(head, s, labels, frame_features(query), first_release=False)
    assert_equal_values_and_gradients(head(support, query, WAY, shot), theirs,
                                      [support, query, *head.parameters()])


@pytest.mark.parametrize("shot", [1, 5])
def test_trx_norm_option_equals_the_first_release(shot):
    head = build_head("trx", channels=8, frames=5, height=3, width=3, shot=shot,
                      options={"dim": 12, "combine": "norm"}).double().eval()
    support, query = episode(shot, seed=3)
    s, labels = interleaved(frame_features(support), shot)
    theirs = official_cnn_trx(head, s, labels, frame_features(query), first_release=True)
    assert_equal_values_and_gradients(head(support, query, WAY, shot), theirs,
                                      [support, query, *head.parameters()])
    with pytest.raises(UserError, match="combine"):
        build_head("trx", channels=8, options={"combine": "max"})


# what version-1 checkpoints recorded (every option but the new one) and the rule they had
VERSION_1 = {"trx": ({"dim": 12, "sets": [2, 3]}, {"combine": "norm"}),
             "tarn": ({"hidden": 4}, {"compare": "mult"})}


@pytest.mark.parametrize("kind", list(VERSION_1))
def test_a_checkpoint_written_before_the_new_default_loads_with_its_old_rule(kind, tmp_path):
    """A checkpoint written the old way (version 1, options without ``combine`` / ``compare``:
    every TRX then combined by the norm, every TARN compared by the product) rebuilds the head
    it was trained as; a new checkpoint keeps its own rule."""
    recorded, rule = VERSION_1[kind]
    head = build_head(kind, channels=8, frames=5, height=3, width=3,
                      options={**recorded, **rule}).eval()
    config = {**vars(head.config), "options": recorded}  # as version 1 wrote it
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "config": config,
                "state_dict": head.state_dict(), "extra": {}}, tmp_path / "old.pt")
    old = load_head(tmp_path / "old.pt")
    assert old.config.options == {**recorded, **rule}
    support, query = (x.float().detach() for x in episode(1))
    torch.testing.assert_close(old(support, query, WAY, 1), head(support, query, WAY, 1))
    new = build_head(kind, channels=8, frames=5, height=3, width=3, options=recorded)
    save_head(new, tmp_path / "new.pt")
    loaded = load_head(tmp_path / "new.pt")
    assert loaded.config == new.config and loaded.config.options != old.config.options
    torch.testing.assert_close(loaded(support, query, WAY, 1), new(support, query, WAY, 1))


# ------------------------------------------------------------------------------ OTAM
def official_cos_sim(x, y, epsilon=0.01):
    """utils.py lines 8-17 (0b5b5b8)."""
    numerator = torch.matmul(x, y.transpose(-1, -2))
    xnorm = torch.norm(x, dim=-1).unsqueeze(-1)
    ynorm = torch.norm(y, dim=-1).unsqueeze(-1)
    denominator = torch.matmul(xnorm, ynorm.transpose(-1, -2)) + epsilon
    dists = torch.div(numerator, denominator)
    return dists


def official_otam_cum_dist(dists, lbda=0.1):
    """OTAM_cum_dist, model.py lines 236-266 (cum_dists in the input's dtype: theirs float32)."""
    dists = F.pad(dists, (1, 1), 'constant', 0)
    cum_dists = torch.zeros(dists.shape, dtype=dists.dtype)
    for m in range(1, dists.shape[3]):
        cum_dists[:, :, 0, m] = dists[:, :, 0, m] + cum_dists[:, :, 0, m - 1]
    for l in range(1, dists.shape[2]):  # noqa: E741 - their name
        cum_dists[:, :, l, 1] = dists[:, :, l, 1] - lbda * torch.log(
            torch.exp(- cum_dists[:, :, l - 1, 0] / lbda)
            + torch.exp(- cum_dists[:, :, l - 1, 1] / lbda)
            + torch.exp(- cum_dists[:, :, l, 0] / lbda))
        for m in range(2, dists.shape[3] - 1):
            cum_dists[:, :, l, m] = dists[:, :, l, m] - lbda * torch.log(
                torch.exp(- cum_dists[:, :, l - 1, m - 1] / lbda)
                + torch.exp(- cum_dists[:, :, l, m - 1] / lbda))
        cum_dists[:, :, l, -1] = dists[:, :, l, -1] - lbda * torch.log(
            torch.exp(- cum_dists[:, :, l - 1, -2] / lbda)
            + torch.exp(- cum_dists[:, :, l - 1, -1] / lbda)
            + torch.exp(- cum_dists[:, :, l, -2] / lbda))
    return cum_dists[:, :, -1, -1]


def official_cnn_otam(support_features, support_labels, target_features):
    """CNN_OTAM.forward after get_feats, model.py lines 276-296."""
    unique_labels = torch.unique(support_labels)
    n_queries, ts, d = target_features.shape
    n_support, ss, _ = support_features.shape
    support_features = support_features.reshape(-1, d)  # 'b s d -> (b s) d'
    target_features = target_features.reshape(-1, d)
    frame_sim = official_cos_sim(target_features, support_features)
    frame_dists = 1 - frame_sim
    # '(tb ts) (sb ss) -> tb sb ts ss'
    dists = frame_dists.reshape(n_queries, ts, n_support, ss).permute(0, 2, 1, 3)
    cum_dists = official_otam_cum_dist(dists) + official_otam_cum_dist(
        dists.permute(0, 1, 3, 2))  # 'tb sb ts ss -> tb sb ss ts'
    class_dists = [torch.mean(torch.index_select(cum_dists, 1,
                                                 extract_class_indices(support_labels, c)), dim=1)
                   for c in unique_labels]
    class_dists = torch.stack(class_dists)
    class_dists = class_dists.t()  # 'c q -> q c'
    return - class_dists


@pytest.mark.parametrize("shot", [1, 5])
def test_otam_equals_the_official_cnn_otam(shot):
    head = build_head("otam", channels=8, frames=5, height=3, width=3, shot=shot)
    support, query = episode(shot, seed=5)
    # small frame norms: the cosine's epsilon 0.01 matters (a 1e-3-level change of distances)
    support, query = (0.3 * support).detach().requires_grad_(), query
    s, labels = interleaved(frame_features(support), shot)
    theirs = official_cnn_otam(s, labels, frame_features(query))
    assert_equal_values_and_gradients(head(support, query, WAY, shot), theirs, [support, query])
    # the batched evaluation path (precompute + score_episodes) gives the same logits
    batched = head.forward_episodes(support[None], query[None], WAY, shot)[0]
    torch.testing.assert_close(batched, theirs, rtol=1e-10, atol=1e-10)


def test_otam_is_finite_in_float32_where_the_official_log_sum_exp_is_not():
    """T = 16 frames of unrelated features: every path costs more than ~10, their
    log(sum(exp(-x / 0.1))) underflows to log(0) in float32; the logsumexp here stays equal to
    the float64 value."""
    support, query = rand(1, 64, 16, seed=7), rand(2, 64, 16, seed=8)  # (n, C, T) frames
    dist64 = 1 - official_cos_sim(query.transpose(1, 2)[:, None], support.transpose(1, 2)[None])
    dist32 = dist64.float()  # (M, S, T, T)
    assert torch.isinf(official_otam_cum_dist(dist32)).any()
    ours = cumulative_alignment(dist32)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), official_otam_cum_dist(dist64), rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------ TRN++
def official_relation_multiscale(fc_fusion_scales, input, picks):
    """RelationModuleMultiScale.forward (TRNmodule.py, 5c5ecf8) with ``picks[scaleID]`` in place
    of its ``np.random.choice(len(relations), 3, replace=False)`` draw."""
    num_segments_total, img_feature_dim = input.shape[1:]
    scales = [i for i in range(num_segments_total, 1, -1)]
    relations_scales = [list(itertools.combinations(range(num_segments_total), scale))
                        for scale in scales]
    act_all = input[:, relations_scales[0][0], :]
    act_all = act_all.view(act_all.size(0), scales[0] * img_feature_dim)
    act_all = fc_fusion_scales[0](act_all)
    for scaleID in range(1, len(scales)):
        for idx in picks[scaleID]:
            act_relation = input[:, relations_scales[scaleID][idx], :]
            act_relation = act_relation.view(act_relation.size(0),
                                             scales[scaleID] * img_feature_dim)
            act_relation = fc_fusion_scales[scaleID](act_relation)
            act_all += act_relation
    return act_all


@pytest.mark.parametrize("shot", [1, 5])
def test_trn_embedding_equals_the_official_multiscale_relation_module(shot):
    t = 6
    head = build_head("trn", channels=8, frames=t, height=3, width=3, shot=shot,
                      options={"dim": 7, "bottleneck": 9, "frame_dim": 5}).double()
    support, query = episode(shot, t=t, seed=9)
    maps = torch.cat([support, query])
    frames = head.frame_fc(frame_features(maps))  # TRN's new_fc: (n, T, 256)
    combos = {s: list(itertools.combinations(range(t), s)) for s in range(2, t + 1)}
    picks = [[combos[s].index(c) for c in relation_tuples(t, s, 3)] for s in range(t, 1, -1)]
    theirs = official_relation_multiscale(head.fusion, frames, picks)
    assert_equal_values_and_gradients(head.embed(maps), theirs, [support, query,
                                                                 *head.parameters()])
    # theirs draws other tuples on every pass; ours are one fixed, even spread
    drawn = np.random.default_rng(0).choice(len(combos[3]), 3, replace=False)
    assert sorted(drawn.tolist()) != picks[t - 3]


# ------------------------------------------------------------------------------ ARN
def official_power_norm(x, sigma):
    """eval_arn.py: power_norm."""
    return 2.0 * torch.sigmoid(sigma * x) - 1.0


def official_similarity_network(net, x):
    """SimilarityNetwork.forward (src/models.py, c682474) up to its final sigmoid, with
    ``net``'s layers (ours: the same Sequential blocks and Linear layers)."""
    out = torch.nn.MaxPool2d(2)(net.layer1(x))
    out = torch.nn.MaxPool2d(2)(out + net.layer2(out))
    out = torch.nn.MaxPool2d(2)(out + net.layer3(out))
    out = torch.nn.MaxPool2d(2)(out + net.layer4(out))
    out = out.view(out.size(0), -1)
    out = F.relu(net.fc1(out))
    return net.fc2(out)  # theirs: F.sigmoid of this (monotone: the same ranking)


def official_arn_scores(head, sample_features, query_features, shot, sigma):
    """eval_arn.py main(), from the detector-weighted features on: the per-video second-order
    loop, the shot mean, the (prototype, query) pairs, SimilarityNetwork."""
    d = sample_features.shape[1]
    so_sample, so_query = [], []
    for dd in range(sample_features.size(0)):
        s = sample_features[dd].view(d, -1)
        s = (1.0 / s.size(1)) * s.mm(s.t())
        so_sample.append(official_power_norm(s / s.trace(), sigma))
    for dd in range(query_features.size(0)):
        t = query_features[dd].view(d, -1)
        t = (1.0 / t.size(1)) * t.mm(t.t())
        so_query.append(official_power_norm(t / t.trace(), sigma))
    so_sample_features = torch.stack(so_sample)[:, None]  # (way*shot, 1, d, d)
    so_query_features = torch.stack(so_query)[:, None]
    query_size = so_query_features.shape[0]
    so_sample_features = so_sample_features.view(WAY, shot, 1, d, d).mean(1)
    sample_features_ext = so_sample_features.unsqueeze(0).repeat(query_size, 1, 1, 1, 1)
    query_features_ext = so_query_features.unsqueeze(0).repeat(WAY, 1, 1, 1, 1)
    query_features_ext = torch.transpose(query_features_ext, 0, 1)
    relation_pairs = torch.cat((sample_features_ext, query_features_ext), 2).view(-1, 2, d, d)
    return official_similarity_network(head.relation, relation_pairs).view(-1, WAY)


@pytest.mark.parametrize("shot", [1, 5])
def test_arn_scoring_equals_the_official_evaluation(shot):
    """From the spatially weighted encoder output on (the adapter encoder and the detector's
    time pooling are this project's, see arn.py), eval mode: BatchNorm's running statistics."""
    head = build_head("arn", channels=8, frames=4, height=4, width=4, shot=shot,
                      options={"dim": 16, "hidden": 4}).double()
    support, query = episode(shot, t=4, h=4, w=4, seed=11)
    head.train()
    head(support, query, WAY, shot)  # running statistics away from their initial values
    head.eval()

    def weighted(maps):
        features = head.encoder(maps)
        return features * (1 + head.attention(features))  # their x * (1 + detector(x))

    theirs = official_arn_scores(head, weighted(support), weighted(query), shot, 100.0)
    assert_equal_values_and_gradients(head(support, query, WAY, shot), theirs,
                                      [support, query, *head.parameters()])


# ------------------------------------------------------------------------------ TARN
def official_tarn(head, S_m, Q_m, bias, sim_type, softmax_dim=-1):
    """TARN.align_and_computelogits (Seleucia/TARN, tarn.py at 33e46c2) before its final sigmoid,
    with ``head``'s W (align), dml_gru (measure) and dml_fc (score); ``softmax_dim``: -1 is
    theirs (over the query segments), -2 the support segments."""
    cos = torch.nn.CosineSimilarity(dim=-1, eps=1e-6)
    A_tmp_lst, H_lst = [], []
    for S, Q in zip(S_m, Q_m):
        A_nomax = torch.matmul(head.align(S).add(bias.repeat(S.shape[1], 1)),
                               torch.transpose(Q, -2, -1))
        A = torch.softmax(A_nomax, dim=softmax_dim)
        H = torch.matmul(torch.transpose(A, -2, -1), S)
        A_tmp_lst.append(A)
        H_lst.append(H)
    diff_QH_lst = []
    for q, h in zip(Q_m, H_lst):
        if sim_type == 'Mult':
            diff_qh = q * h
        elif sim_type == 'Subt':
            diff_qh = q - h
        elif sim_type == 'EucCos':
            diff_QH_c = cos(q, h)
            diff_QH_e = torch.norm(q - h, dim=2)
            diff_qh = torch.stack((diff_QH_c, diff_QH_e), -1)
        diff_QH_lst.append(diff_qh.squeeze(0))
    diff_QH = torch.nn.utils.rnn.pad_sequence(diff_QH_lst).permute(1, 0, 2)
    return head.score(head.measure(diff_QH)[1].squeeze())  # q_kc before torch.sigmoid


def official_tarn_logits(head, support, query, shot, bias, sim_type, softmax_dim):
    """Every (query, support video) pair through their pairwise code (embed_gru with full
    lengths), our K-shot rule on top: a class's logit is the mean of its shots' scores."""
    s = head.encoder(frame_features(support))[0]  # feats_gru: (S, T, 2h)
    q = head.encoder(frame_features(query))[0]  # (M, T, 2h)
    pairs = [(m, j) for m in range(q.shape[0]) for j in range(s.shape[0])]
    scores = official_tarn(head, [s[j][None] for _, j in pairs], [q[m][None] for m, _ in pairs],
                           bias, sim_type, softmax_dim)
    return scores.view(q.shape[0], WAY, shot).mean(-1)


SIM_TYPES = {"euccos": "EucCos", "mult": "Mult", "subt": "Subt"}


@pytest.mark.parametrize("compare", list(SIM_TYPES))
@pytest.mark.parametrize("shot", [1, 5])
def test_tarn_equals_the_unofficial_code_with_the_softmax_over_support_segments(shot, compare):
    head = build_head("tarn", channels=8, frames=5, height=3, width=3, shot=shot,
                      options={"hidden": 4, "compare": compare}).double()
    support, query = episode(shot, queries=3, seed=13)
    bias = torch.ones(8, dtype=F64)  # their b, initialised to ones: it cancels over support
    ours = head(support, query, WAY, shot)
    theirs = official_tarn_logits(head, support, query, shot, bias, SIM_TYPES[compare], -2)
    assert_equal_values_and_gradients(ours, theirs, [support, query, *head.parameters()])
    # the axis of their code (over the query segments) is another function: the deviation
    official_axis = official_tarn_logits(head, support, query, shot, bias, SIM_TYPES[compare],
                                         -1)
    assert (official_axis - ours).abs().max() > 1e-6
