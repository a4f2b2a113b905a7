"""The distiller recovers planted features: exact held-out F1, the planted tokens in the graph."""

import json

import numpy as np
import pytest
import torch

import n2g
from n2g.errors import N2GError
from n2g.graph import AUTO_QUANTILES, WILDCARD, NeuronGraph
from n2g.score import score_arrays

from planted import RULES, after, after_family, dead, shifted, strengths, text, two_context

TOKENS = {"single": {7}, "after": {8, 9}, "gap": {10, 11}, "either": {12, 13}, "strengths": {14, 15},
          "two_context": {16, 17, 18}, "negative": {19}}


def heldout_scores(model, feature, patterns, sign=1.0):
    test = text(99, patterns, n=120)
    true = (feature(test) * sign / model.scale).numpy()
    return score_arrays([true], [model.predict_normalised(test)])


CASES = [(rule, "default") for rule in sorted(RULES)] + [(rule, "paper") for rule in sorted(RULES) if rule != "strengths"]


@pytest.mark.parametrize("rule,preset_name", CASES)
def test_planted_rule_recovered_on_heldout_text(rule, preset_name):
    feature, patterns = RULES[rule]
    sign = "negative" if rule == "negative" else "positive"
    model = n2g.distill(feature, text(1, patterns), preset_name=preset_name, sign=sign)
    assert model.status_ == "fitted"
    scores = heldout_scores(model, feature, patterns, -1.0 if sign == "negative" else 1.0)
    assert scores.n_firing > 0
    assert scores.f1 == 1.0, (rule, scores)
    assert TOKENS[rule] <= model.graph_.tokens()
    assert model.scores_["n2g"].f1 == 1.0


def test_gap_rule_uses_a_wildcard():
    feature, patterns = RULES["gap"]
    graph = n2g.distill(feature, text(1, patterns)).graph_
    (activator,) = [graph.nodes[i] for i in graph.nodes[0].children.values()]
    assert activator.token_id == 10
    assert list(activator.children) == [WILDCARD]
    assert list(graph.nodes[activator.children[WILDCARD]].children) == [11]


def test_two_strengths_are_predicted_on_the_features_scale():
    model = n2g.distill(strengths, text(1, [[14], [15]]))
    pred = model.predict(torch.tensor([[40, 14, 41, 15, 42]]))
    np.testing.assert_allclose(pred[0], [0.0, 4.0, 0.0, 2.4, 0.0], rtol=1e-6)


def test_paper_preset_misses_a_weaker_activator_that_default_recovers():
    # The published method prunes only around each example's maximum, so a token that fires at
    # 60 % in excerpts whose maximum is another token never gets a path; default prunes every
    # firing position of the training evidence (cover), whatever it prunes.
    test = text(99, [[14], [15]], n=120)
    true = (strengths(test) / 4.0).numpy()
    paper = n2g.distill(strengths, text(1, [[14], [15]]), preset_name="paper")
    default = n2g.distill(strengths, text(1, [[14], [15]]), preset_name="default")
    assert 15 not in paper.graph_.tokens() and 15 in default.graph_.tokens()
    assert score_arrays([true], [paper.predict_normalised(test)]).f1 < 1.0
    assert score_arrays([true], [default.predict_normalised(test)]).f1 == 1.0


def test_negative_side_predicts_negative_values():
    feature, patterns = RULES["negative"]
    model = n2g.distill(feature, text(1, patterns), sign="negative")
    pred = model.predict(torch.tensor([[40, 19, 41]]))
    np.testing.assert_allclose(pred[0], [0.0, -1.5, 0.0], rtol=1e-6)
    # The positive side of the same feature never fires: a clear "dead" result.
    assert n2g.distill(feature, text(1, patterns), sign="positive").status_ == "dead"


def test_dead_feature_is_a_result_not_a_crash():
    model = n2g.distill(dead, text(1, [[7]]))
    assert model.status_ == "dead"
    assert model.stats_.max_activation == 0.0
    assert np.all(model.predict(torch.tensor([[7, 8, 9]])) == 0)


def test_nan_activations_raise_a_clear_error():
    with pytest.raises(N2GError, match="NaN or infinite"):
        n2g.distill(lambda x: torch.full(x.shape, float("nan")), text(1, [[7]]), name="L3.N5")


def test_short_excerpts_shorter_than_the_pruning_window():
    feature, patterns = RULES["after"]
    short = text(1, [[9, 8]], n=200, length=6, rate=0.6)
    model = n2g.distill(feature, short)
    assert heldout_scores(model, feature, patterns).f1 == 1.0


def test_augmentation_learns_which_substitutes_still_fire():
    train = text(1, [[9, 8], [8]])  # only 9 ever precedes a firing 8 in training
    probe = torch.tensor([[40, 21, 8, 41, 22, 8, 42, 23, 8, 43, 9, 8]])
    substitutes = lambda seqs, positions, k: [[21, 22, 23, 24] for _ in seqs]
    plain = n2g.distill(after_family, train, augment=False)
    augmented = n2g.distill(after_family, train, augment=True, substitutes=substitutes, augment_positions="important")
    expected = after_family(probe).numpy()[0]
    assert plain.predict_normalised(probe)[0].tolist() != expected.tolist()
    np.testing.assert_allclose(augmented.predict_normalised(probe)[0], expected)
    assert {21, 22} <= augmented.graph_.tokens()
    assert 23 not in augmented.graph_.tokens()


def test_variants_can_borrow_their_source_importance_and_skip_occlusion():
    train = text(1, [[9, 8], [8]])
    probe = torch.tensor([[40, 21, 8, 41, 22, 8, 42, 23, 8, 43, 9, 8]])
    substitutes = lambda seqs, positions, k: [[21, 22, 23, 24] for _ in seqs]
    rows = {"measured": 0, "source": 0}

    def counted(kind):
        def feature(x):
            rows[kind] += x.shape[0] * x.shape[1]
            return after_family(x)
        return feature

    models = {kind: n2g.distill(counted(kind), train, augment=True, substitutes=substitutes, variant_importance=kind,
                                augment_positions="important") for kind in rows}
    expected = after_family(probe).numpy()[0]
    for model in models.values():
        np.testing.assert_allclose(model.predict_normalised(probe)[0], expected)
        assert {21, 22} <= model.graph_.tokens() and 23 not in model.graph_.tokens()
    assert rows["source"] < rows["measured"]


def test_default_augmentation_teaches_activators_the_training_text_never_shows():
    family = lambda x: ((x == 8) | (x == 21) | (x == 22)).float()  # training text shows only 8
    train = text(1, [[8]])
    asked = []

    def substitutes(seqs, positions, k):
        asked.extend(seq[p] for seq, p in zip(seqs, positions))
        return [[21, 40, 22, 23] for _ in seqs]  # 40 is common in the training text: never substituted

    evaluated = []

    def feature(x):
        evaluated.extend(x.reshape(-1).tolist())
        return family(x)

    plain = n2g.distill(family, train, augment=False)
    model = n2g.distill(feature, train, substitutes=substitutes)  # default: the activator, novel substitutes
    assert set(asked) == {8}  # only the activator was substituted
    assert 40 not in model.graph_.tokens() and 23 not in model.graph_.tokens()
    assert {8, 21, 22} <= model.graph_.tokens() and not {21, 22} & plain.graph_.tokens()
    probe = torch.tensor([[41, 21, 50, 22, 60, 23, 70, 8, 40]])
    np.testing.assert_allclose(model.predict_normalised(probe)[0], family(probe).numpy()[0])
    assert plain.predict_normalised(probe)[0].tolist() != family(probe).numpy()[0].tolist()
    assert {v.token_ids[v.position] for v in model.trace_.variants} == {21, 22, 23}  # 40 never measured
    assert 23 in evaluated


def test_graph_json_round_trip_is_identical(tmp_path):
    feature, patterns = RULES["two_context"]
    graph = n2g.distill(feature, text(1, patterns), augment=False).graph_
    graph.token_text = {i: f"<tok {i} \"q\">" for i in graph.tokens()}
    path = graph.save(tmp_path / "graph.json")
    loaded = NeuronGraph.load(path)
    assert json.dumps(loaded.to_dict(), sort_keys=True) == json.dumps(graph.to_dict(), sort_keys=True)
    probe = text(5, patterns, n=20)
    np.testing.assert_array_equal(loaded.predict_sequence(probe[0].tolist()), graph.predict_sequence(probe[0].tolist()))


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_an_end_value_just_below_the_fire_threshold_stays_quiet_in_graph_json(tmp_path, threshold):
    # calibrate(end_value="mean") keeps a node the chosen quantile calls quiet just below the threshold
    # (nextafter(float32(threshold), 0)); graph.json rounded it to 6 decimals, onto the threshold itself, so the
    # saved graph (what search, predict, the server and compare read) fired where the scored graph did not,
    # and its drawing no longer counted the activator quiet
    from n2g.render import is_quiet, load_graph_json

    below = float(np.nextafter(np.float32(threshold), np.float32(0)))
    graph = NeuronGraph(fire_threshold=threshold)
    graph.add_path([(5, 1.0)], below)
    graph.add_path([(6, 1.0)], threshold)
    path = graph.save(tmp_path / "graph.json")
    for g in (graph, NeuronGraph.load(path)):
        assert (g.predict_sequence([5, 6]) >= threshold).tolist() == [False, True]
    G = load_graph_json(path)
    quiet = {a["token_id"] for _, a in G.nodes(data=True) if is_quiet(a, G.graph["fire_threshold"])}
    assert quiet == {5}
    # its text forms read it on its own side of the threshold too (they printed 0.50 / 0.30 with 2 decimals)
    from n2g.render import to_dot

    shown, firing = f"{threshold - 0.01:.2f}", f"{threshold:.2f}"
    lines = graph.describe().splitlines()
    assert [ln.split()[-2] for ln in lines[2:]] == [firing, shown], lines
    dot = to_dot(G)
    assert f"act {shown}" in dot and dot.count(f"act {firing}") == 1, dot


@pytest.mark.parametrize("value, threshold, text", [
    (0.49999997, 0.5, "0.49"), (0.5, 0.5, "0.50"), (0.4951, 0.5, "0.49"), (0.494, 0.5, "0.49"), (0.7, 0.5, "0.70"),
    (0.5049, 0.505, "0.50"), (0.505, 0.505, "0.51"), (0.30000001, 0.3, "0.30"), (0.29999999, 0.3, "0.29"),
    (-0.0001, 0.0, "-0.01"), (-0.0001, 0.5, "0.00"), (-0.004, 0.5, "0.00"), (-0.006, 0.5, "-0.01"), (float("nan"), 0.5, "nan"),
])
def test_shown_fixed_keeps_a_value_on_its_own_side_of_the_threshold(value, threshold, text):
    from n2g.graph import shown_fixed

    assert shown_fixed(value, threshold) == text


def test_describe_lists_paths_that_fire_first_at_the_graphs_own_threshold():
    # paths() ordered the graph's networkx form, which carries no fire threshold, so at the default 0.5: a graph
    # fitted at 0.3 listed a quiet path seen often ([6] 0.20 x50) before the one that fires ([5] 0.35)
    graph = NeuronGraph(fire_threshold=0.3)
    graph.add_path([(5, 1.0)], 0.35)
    for _ in range(50):
        graph.add_path([(6, 1.0)], 0.2)
    assert [p["tokens"] for p in graph.paths()] == [["5"], ["6"]]
    assert [ln.split()[0] for ln in graph.describe().splitlines()[2:]] == ["[5]", "[6]"]


def test_no_firing_test_token_is_reported_not_perfect():
    s = score_arrays([np.zeros(10)], [np.zeros(10)])
    assert s.f1 is None and s.status == "no_firing_test_token"
    assert s.nonfiring_f1 == 1.0


def test_exact_scores():
    true = np.array([1.0, 0.9, 0.1, 0.0, 0.6, 0.2])
    pred = np.array([1.0, 0.0, 0.7, 0.0, 0.5, 0.0])
    s = score_arrays([true[:3], true[3:]], [pred[:3], pred[3:]])
    # firing: tp=2 (0, 4), fp=1 (2), fn=1 (1)
    assert (s.precision, s.recall) == (2 / 3, 2 / 3)
    assert s.f1 == pytest.approx(2 / 3)
    # non-firing: tn=2 (3, 5), fn of that class = 1 (2), fp = 1 (1)
    assert s.nonfiring_precision == 2 / 3 and s.nonfiring_recall == 2 / 3
    assert s.pearson == pytest.approx(float(np.corrcoef(true, pred)[0, 1]))
    assert s.n_tokens == 6 and s.n_firing == 3


def test_end_activation_first_versus_mean():
    g_first, g_mean = NeuronGraph("first"), NeuronGraph("mean")
    for g in (g_first, g_mean):
        g.add_path([(5, 1.0)], 0.9)
        g.add_path([(5, 1.0)], 0.5)
    assert g_first.predict_sequence([5])[0] == pytest.approx(0.9)
    assert g_mean.predict_sequence([5])[0] == pytest.approx(0.7)


def test_search_match_finds_deeper_end_behind_a_wildcard():
    for match, expected in (("greedy", 0.0), ("search", 1.0)):
        g = NeuronGraph(match=match)
        g.add_path([(5, 1.0), (6, 1.0), (7, 1.0)], 0.8)  # 7 6 5 -> 0.8
        g.add_path([(5, 1.0), (WILDCARD, 0.0), (9, 1.0)], 1.0)  # 9 * 5 -> 1.0
        assert g.predict_sequence([9, 6, 5])[-1] == pytest.approx(expected)


def test_calibration_lowers_an_end_that_training_tokens_contradict():
    g = NeuronGraph("mean")
    g.add_path([(5, 1.0)], 1.0)
    g.calibrate([([5, 1, 5, 2, 5], np.array([1.0, 0, 0.0, 0, 0.2]))])
    assert g.predict_sequence([5])[0] == pytest.approx(0.4)


def test_graph_displays_inline_as_svg_in_a_notebook():
    from n2g.render import dot_available

    feature, patterns = RULES["after"]
    graph = n2g.distill(feature, text(1, patterns)).graph_
    graph.token_text = {8: "<b>eight</b>", 9: " nine"}
    svg = graph._repr_svg_()
    if not dot_available():
        assert svg is None
        return
    assert svg.lstrip().startswith("<svg") and "&lt;b&gt;eight&lt;/b&gt;" in svg and "<b>eight" not in svg


def _sometimes_seven(with_context: bool):
    """Token 7 fires 1 time in 6 (a context no trie expresses); with_context adds "7 after 9", always firing."""
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(60):
        ids = [int(t) for t in rng.integers(20, 40, size=12)]
        acts = np.zeros(12)
        ids[5] = 7
        acts[5] = 1.0 if rng.random() < 0.2 else 0.0
        if with_context:
            ids[9], ids[10] = 9, 7
            acts[10] = 1.0
        seqs.append((ids, acts))
    assert np.mean([a[5] for _, a in seqs]) == pytest.approx(1 / 6)
    graphs = {}
    for statistic in ("0.7", "auto"):
        g = NeuronGraph("mean", "search")
        g.add_path([(7, 1.0)], 1.0)
        g.add_path([(7, 1.0), (9, 1.0)], 1.0)
        g.calibrate(seqs, backoff=True, statistic=statistic, min_count=3)
        graphs[statistic] = g
    f1 = {k: score_arrays([a for _, a in seqs], [g.predict_sequence(s) for s, _ in seqs]).f1 for k, g in graphs.items()}
    return graphs["0.7"], graphs["auto"], f1


def test_auto_quantile_fires_on_a_sometimes_firing_token_when_nothing_better_exists():
    fixed, auto, f1 = _sometimes_seven(with_context=False)
    assert fixed.predict_sequence([30, 7])[1] == 0.0 and f1["0.7"] == 0.0
    assert auto.end_quantile == AUTO_QUANTILES[-1] and auto.predict_sequence([30, 7])[1] == 1.0  # ties: highest
    assert f1["auto"] == pytest.approx(2 * (1 / 6) / (1 + 1 / 6))  # precision 1/6, recall 1


def test_auto_quantile_keeps_a_sometimes_firing_token_quiet_when_a_context_explains_most_firing():
    fixed, auto, f1 = _sometimes_seven(with_context=True)
    assert auto.end_quantile < 0.9
    assert auto.predict_sequence([30, 7])[1] == 0.0 and auto.predict_sequence([9, 7])[1] == 1.0
    assert f1["auto"] == pytest.approx(120 / 130)  # 60 of 70 firing tokens recalled, no false firing
    assert f1["auto"] >= f1["0.7"]


def test_cover_adds_every_training_activator():
    # Only the best excerpt is pruned, so token 8 (a weaker, rarer activator) starts no pruned path;
    # cover gives it a one-token path that calibration then values.
    feature = lambda ids: torch.where(ids == 7, 1.0, 0.0) + torch.where(ids == 8, 0.6, 0.0)
    excerpts = torch.cat([text(3, [[7]], n=40, rate=1.0), text(4, [[8]], n=40, rate=1.0)])
    plain = n2g.distill(feature, excerpts, cover=False, n_prune=1, max_pivots=1)
    covered = n2g.distill(feature, excerpts, cover=True, n_prune=1, max_pivots=1)
    assert set(plain.graph_.activators()) == {7}
    assert set(covered.graph_.activators()) == {7, 8}
    assert covered.predict(torch.tensor([[40, 8]]))[0, 1] == pytest.approx(0.6)
    unknown = plain.predict(torch.tensor([[40, 8, 41]]))[0]  # 8 is one of the tokens it does not know
    assert unknown[1] < 0.05 and unknown[2] < 0.05  # predicted quiet: the background, or 41's own mean


def _seven_after_rare_contexts(rng, rare_base):
    """60 sequences with token 7 at position 5: 20 after a rare token seen once (always firing), 40
    after common tokens (firing in 12). So 7 fires in 32 of 60 contexts."""
    seqs = []
    for k in range(60):
        ids = [int(t) for t in rng.integers(20, 40, size=12)]
        acts = np.zeros(12)
        ids[5] = 7
        if k < 20:
            ids[4] = rare_base + k
        acts[5] = 1.0 if k < 32 else 0.0
        seqs.append((ids, acts))
    return seqs


def test_out_of_sample_choice_does_not_trust_paths_that_only_their_own_excerpt_supports():
    rng = np.random.default_rng(0)
    train = _seven_after_rare_contexts(rng, 100)
    graphs = {}
    for oos in (False, True):
        g = NeuronGraph("mean", "search")
        for k in range(20):  # pruning made one path per rare context, each from its own excerpt
            g.add_path([(7, 1.0), (100 + k, 1.0)], 1.0, source=k)
        g.calibrate(train, backoff=True, statistic="auto", min_count=3, sources=list(range(60)) if oos else None)
        graphs[oos] = g
    # In sample the rare-context paths recall their own 20 firing tokens, so keeping bare 7 quiet
    # scores best (F1 40/52 against 64/92); out of sample those tokens fall back to bare 7, which then
    # must fire (F1 64/92 against 0).
    assert graphs[False].end_quantile == 0.7 and graphs[True].end_quantile == AUTO_QUANTILES[-1]
    assert graphs[False].predict_sequence([30, 200, 7])[2] < 0.5
    assert graphs[True].predict_sequence([30, 200, 7])[2] == 1.0
    test = _seven_after_rare_contexts(rng, 300)  # the same process with rare tokens never seen
    f1 = {oos: score_arrays([a for _, a in test], [g.predict_sequence(s) for s, _ in test]).f1 for oos, g in graphs.items()}
    assert f1[False] == 0.0
    assert f1[True] == pytest.approx(64 / 92)


def test_fitted_paths_record_the_training_excerpts_that_made_them():
    feature, patterns = RULES["after"]
    model = n2g.distill(feature, text(11, patterns, n=80), grow=False)  # grown branches: see test_grow.py
    seen = ([e for e in model.examples_ if e.split == "train" and e.source == "top"]
            + [e for e in model.examples_ if e.split == "train" and e.source == "random"])
    g = model.graph_
    assert g.nodes[g.nodes[0].children[8]].sources
    checked = 0
    for activator in g.nodes[0].children.values():
        token = g.nodes[activator].token_id
        stack = [activator]
        while stack:  # every excerpt that made a node under this activator has that token firing
            node = g.nodes[stack.pop()]
            stack.extend(node.children.values())
            for k in node.sources:
                assert any(t == token and a >= 0.5 for t, a in zip(seen[k].token_ids, seen[k].activations))
                checked += 1
    assert checked >= 10
    # Exactly the pruned excerpts made paths: the best n_prune training top excerpts (only token 8
    # fires, so cover adds no path of its own).
    tops = [k for k, e in enumerate(seen) if e.source == "top"]
    pruned = sorted(tops, key=lambda k: -max(seen[k].activations))[: model.config.n_prune]
    pruned = [k for k in pruned if max(seen[k].activations) >= 0.5]  # an excerpt where nothing fires makes no path
    assert len(pruned) >= 10
    assert set().union(*(n.sources for n in g.nodes)) == set(pruned)


def test_random_pool_is_seeded_distinct_and_a_larger_pool_extends_a_smaller_one():
    from n2g.examples import random_pool

    small, large = random_pool(500, 60, seed=3), random_pool(500, 160, seed=3)
    assert len(set(large)) == 160 and all(0 <= i < 500 for i in large)
    assert large[:60] == small  # more random training excerpts leave the test ones unchanged
    assert random_pool(500, 60, seed=4) != small
    assert sorted(random_pool(10, 50)) == list(range(10))


def test_pruning_a_step_at_a_time_and_reusing_prefixes_keeps_the_same_windows():
    """The grid measured shortest step first (and stored prefixes reused) picks the same window as
    measuring every window; only fewer positions go to the feature."""
    from n2g.features import drive
    from n2g.config import preset
    from n2g.prune import prune_steps

    rng = np.random.default_rng(5)
    asked = []

    def feature(seqs):  # fires on 9, more strongly the nearer a 3 is before it (causal)
        out = []
        for s in seqs:
            asked.append(len(s))
            v = np.zeros(len(s))
            for j, t in enumerate(s):
                if t == 9:
                    back = [d for d in range(1, j + 1) if s[j - d] == 3]
                    v[j] = 1.0 / (1 + min(back)) if back else 0.05
            out.append(v)
        return out

    examples = []
    for _ in range(30):
        ids = rng.integers(10, 20, size=40).tolist()
        pivot = int(rng.integers(0, 40))
        ids[pivot] = 9
        if rng.random() < 0.8:
            ids[max(0, pivot - int(rng.integers(1, 35)))] = 3
        examples.append((ids, feature([ids])[0], pivot))
    asked.clear()
    staged = drive(prune_steps(examples, preset("default")), feature)
    staged_positions = sum(asked)
    asked.clear()
    every = drive(prune_steps(examples, preset("default", prune_search="exhaustive")), feature)
    # exhaustive finds the shortest window of all; the staged coarse grid must find the same ones here
    # (the rule is monotone in context length) while measuring fewer positions
    assert [p.token_ids for p in staged] == [p.token_ids for p in every]
    assert staged_positions < sum(asked)


def test_linear_quantiles_equal_numpy_bit_for_bit():
    """calibrate's batched quantiles of every END at once are np.quantile's, to the last bit."""
    from n2g.graph import AUTO_QUANTILES, linear_quantiles

    rng = np.random.default_rng(0)
    groups = [rng.normal(size=int(rng.integers(1, 120))) for _ in range(60)]
    groups += [np.asarray([0.0, -0.0, 0.5]), np.asarray([-0.0]), np.asarray([1.0, 1.0]), np.asarray([0.3, np.nan])]
    got = linear_quantiles(groups, AUTO_QUANTILES)
    assert len(got) == len(groups)
    for g, row in zip(groups, got):
        assert np.asarray(row).tobytes() == np.quantile(g, AUTO_QUANTILES).tobytes()


def test_token_ceiling_counts_test_firing_tokens_training_never_shows_firing():
    from n2g.distill import token_ceiling
    from n2g.records import Example

    train_ids = [np.array([5, 6, 7, 8]), np.array([6, 9])]
    train_acts = [np.array([0.9, 0.1, 0.0, 0.6]), np.array([0.2, 0.0])]  # 5 and 8 fire; 6 and 9 never do
    test = [Example([5, 6, 9, 8], [1.0, 0.7, 0.0, 0.5]), Example([7, 5], [0.8, 0.1])]
    c = token_ceiling(train_ids, train_acts, test, 0.5)
    # firing test tokens: 5, 6, 8 (first excerpt) and 7 (second); 5 and 8 fire in training, 6 and 7 do not
    assert (c["n_firing"], c["n_seen"]) == (4, 2)
    assert c["f1"] == pytest.approx(2 * 0.5 / 1.5)
    assert token_ceiling(train_ids, train_acts, [Example([5], [0.1])], 0.5) == {"n_firing": 0, "n_seen": 0, "f1": None}


def test_a_fit_reports_its_token_ceiling_beside_its_scores():
    feature = RULES["single"][0]
    model = n2g.distill(feature, text(1, RULES["single"][1]))
    test = [e for e in model.examples_ if e.split == "test"]
    firing = sum(int(np.sum(np.asarray(e.activations) >= 0.5)) for e in test)
    assert model.ceiling_["n_firing"] == firing == model.scores_["n2g"].n_firing > 0
    assert model.ceiling_["n_seen"] == firing and model.ceiling_["f1"] == 1.0  # one planted token, seen firing in training


GOOD = [[1, 7, 3, 4, 5, 7, 8, 9]] * 3 + [[2, 3, 4, 5, 6, 7, 1]] * 3 + [[9, 7, 7, 2, 3]] * 4
SEVEN = lambda ids: (ids == 7).float() * 3


def test_options_change_a_given_config_and_a_wrong_config_is_refused():
    """distill(f, x, config=cfg, min_count=5) applies min_count to cfg (it was silently dropped), an
    unknown option beside a config is refused, and a config that is not a DistillConfig is one line."""
    model = n2g.distill(SEVEN, GOOD, config=n2g.preset("paper"), min_count=5, name="f")
    assert model.config.min_count == 5 and model.config.rescale_pruned  # paper's own settings kept
    with pytest.raises(N2GError, match="unknown option 'bogus'"):
        n2g.distill(SEVEN, GOOD, config=n2g.preset("paper"), bogus=1)
    with pytest.raises(N2GError, match="config must be an n2g.DistillConfig"):
        n2g.distill(SEVEN, GOOD, config={"min_count": 5})
    with pytest.raises(N2GError, match="unknown preset"):
        n2g.distill(SEVEN, GOOD, preset_name=["paper"])
    with pytest.raises(N2GError, match="substitutes must be callable"):
        n2g.distill(SEVEN, GOOD, substitutes=5, augment=True)
    with pytest.raises(N2GError, match="refit must be True"):  # a string would have been taken as True
        n2g.distill(SEVEN, GOOD, refit="no")
    with pytest.raises(N2GError, match="complex numbers"):  # was cast to real with a UserWarning
        n2g.distill(lambda ids: (ids == 7).to(torch.complex64) * 1j, GOOD)


def test_none_is_a_setting_where_a_field_takes_it():
    """``n_prune=None`` (prune every training excerpt) and ``occlusion_text=None`` (the model's own occlusion
    token) were dropped as "not given", so the preset's 20 and '"' stayed; a None for a field that takes no
    None (the CLI's flags left out) still means "not given", and a misspelt name with None is refused."""
    from n2g.config import preset

    assert preset("default", n_prune=None).n_prune is None and preset("default").n_prune == 20
    assert preset("paper", occlusion_text=None).occlusion_text is None
    assert preset("default", augment=None, written=None).augment and preset("default", written=None).written == 512
    with pytest.raises(N2GError, match="unknown option 'n_prun'"):
        preset("default", n_prune=20, n_prun=None)
    feature = lambda ids: (ids == 7).float()  # every excerpt fires on 7: more than 20 training excerpts to prune
    excerpts = text(3, [(7,)], n=120, rate=1.0)
    for how in ({}, {"config": n2g.preset("default")}):
        every = n2g.distill(feature, excerpts, n_prune=None, written=None, refit=False, **how)
        some = n2g.distill(feature, excerpts, refit=False, **how)
        assert every.config.n_prune is None
        assert len(some.trace_.pruned) == 20 < len(every.trace_.pruned)


@pytest.mark.parametrize("held_out", [0.5, 0.25, 0.75, 0.8])
def test_the_scan_keeps_enough_top_and_random_excerpts_for_both_sides_at_any_held_out(held_out):
    """The scan keeps ``top_k`` excerpts per neuron (the best of the whole corpus) and a pool of ``pool_size``
    random ones, which the partition then splits; both were sized for held_out 0.5, so at 0.8 a neuron got
    about 25 of its 40 training top excerpts and 32 of its 40 training random ones, silently. (As at 0.5, a
    neuron whose best excerpts happen to fall mostly on one side may still get a few fewer.)"""
    from n2g.activations import partition
    from n2g.distill import pool_size, top_k
    from n2g.examples import random_pool, split_examples

    cfg = n2g.preset("default", held_out=held_out)
    n = 4000
    is_train = partition(n, cfg.held_out, cfg.seed)
    train_top = []
    for neuron in range(50):  # each neuron's strongest excerpts: any k of the corpus
        ranked = np.random.default_rng(neuron).permutation(n)[: top_k(cfg)].tolist()
        split = split_examples(ranked, random_pool(n, pool_size(cfg), cfg.seed), cfg, is_train)
        train_top.append(len(split.train_top))
        assert len(split.test_top) == cfg.n_top // 2
        assert len(split.train_random) == cfg.n_random_train and len(split.test_random) == cfg.n_random_test
    assert np.mean(train_top) >= 0.98 * ((cfg.n_top + 1) // 2 + cfg.n_extra_train)
    if held_out == 0.5:  # the default's scans (and their cache entries) are as they were
        assert (top_k(cfg), pool_size(cfg)) == (100, 200)


def test_excerpts_as_tensors_that_need_grad_or_as_a_list_of_1d_tensors():
    """Excerpts straight from a tokenizer or a hook library: a list of 1-D LongTensors is a list of
    excerpts; a tensor is read off its device and autograd graph, so a float one that needs grad
    is refused in one line (not torch's "Can't call numpy() on Tensor that requires grad")."""
    rows = [torch.tensor(r) for r in GOOD]
    assert n2g.distill(SEVEN, rows).status_ == "fitted"
    with pytest.raises(N2GError, match="whole number"):
        n2g.distill(SEVEN, torch.tensor(GOOD[:3], dtype=torch.float32, requires_grad=True))
    with pytest.raises(N2GError, match="one sequence of token ids"):
        n2g.distill(SEVEN, [torch.tensor([[1, 7]])])


def test_fitted_model_refuses_bad_masks_activations_and_examples_in_one_line():
    model = n2g.distill(SEVEN, GOOD)
    ids = [[9, 7, 3]]
    assert model.predict(ids, attention_mask=[[1, 1, 0]]).tolist() == [[0.0, 3.0, 0.0]]
    assert model.predict([9, 7, 3], attention_mask=[1, 1, 1]).tolist() == [0.0, 3.0, 0.0]
    for mask in ([[1, 1]], "abc", [[1, 0.5, 0]], [[1, 2, 0]]):  # wrong shape (was numpy's broadcast error), not 0/1
        with pytest.raises(N2GError, match="attention_mask must be"):
            model.predict(ids, attention_mask=mask)
    for y in ([["a", "b", "c"]], [[0, 3], [1]]):  # was numpy's ValueError
        with pytest.raises(N2GError, match="true activations must be numbers"):
            model.score([[9, 7, 3], [1, 2, 3]] if len(y) == 2 else ids, y)
    with pytest.raises(N2GError, match="1 activations"):  # was score_arrays' ValueError
        model.score([n2g.Example([1, 2, 3], [0.1])])
    with pytest.raises(N2GError, match="NaN or infinite"):  # was a Scores with explained_variance nan
        model.score([n2g.Example([1, 7, 3], [float("nan"), 1.0, 0.0])])
    with pytest.raises(N2GError, match="list of n2g.Example"):  # was AttributeError deep in fit_steps
        n2g.NeuronModel(SEVEN).fit([1, 2, 3])


@pytest.mark.parametrize("damage, needle", [
    (lambda d: [n.update(count=10**12) for n in d["graph"]["nodes"] if n["kind"] == "end"], "count"),  # was MemoryError
    (lambda d: d["graph"]["nodes"].append({"id": "9.end", "kind": "end", "activation": 1.0, "count": 1,
                                           "depth": 0}), "hangs from 0 nodes"),  # was a raw StopIteration
    (lambda d: [n.update(token_id=-7) for n in d["graph"]["nodes"] if n["kind"] == "activator"], "token_id -7"),
    (lambda d: d.update(fire_threshold="abc"), "fire_threshold"),  # loaded, then predict raised TypeError
    (lambda d: d.update(match="bogus"), "match 'bogus'"),
    (lambda d: d.update(end_activation="bogus"), "end_activation 'bogus'"),
])
def test_a_tampered_graph_file_is_refused_in_one_line(tmp_path, damage, needle):
    path = n2g.distill(SEVEN, GOOD).graph_.save(tmp_path / "graph.json")
    d = json.loads(path.read_text())
    damage(d)
    path.write_text(json.dumps(d))
    with pytest.raises(N2GError, match=needle):
        NeuronGraph.load(path)


@pytest.mark.parametrize("bad", [lambda seqs, p, k: None, lambda seqs, p, k: [[21, -4] for _ in seqs],
                                 lambda seqs, p, k: [[21]], lambda seqs, p, k: ["abc" for _ in seqs],
                                 lambda seqs, p, k: [[21.5] for _ in seqs]])
def test_a_substitutes_callable_answering_anything_but_token_id_lists_is_one_line(bad):
    train = text(1, [[9, 8], [8]])
    with pytest.raises(N2GError, match="a substitutes callable must return one list of token ids"):
        n2g.distill(after_family, train, augment=True, substitutes=bad, augment_positions="important")
    ok = lambda seqs, p, k: [np.array([21, 22]) for _ in seqs]  # arrays of ids are fine
    assert 21 in n2g.distill(after_family, train, augment=True, substitutes=ok, augment_positions="important").graph_.tokens()


def _seven_unless_after_blocker(x):  # token 7 fires, unless the token right before it is 20 or 21
    prev = shifted(x, 1)
    return ((x == 7) & (prev != 20) & (prev != 21)).float()


def _plant(x, rows, pattern, seed):
    g = torch.Generator().manual_seed(seed)
    for r in rows:
        at = int(torch.randint(2, x.shape[1], (1,), generator=g))
        x[r, at - len(pattern) + 1 : at + 1] = torch.tensor(pattern)


def test_the_final_graph_learns_from_every_excerpt_and_the_scores_stay_held_out():
    from n2g.activations import partition

    cfg = n2g.preset("default")
    x = text(5, [[7], [20, 7]], n=160, rate=0.3)
    held = np.flatnonzero(~partition(len(x), cfg.held_out, cfg.seed))
    _plant(x, held[:8], [21, 7], 1)  # blocker 21 comes before 7 only in excerpts the scored fit holds out
    scored = n2g.distill(_seven_unless_after_blocker, x, refit=False)
    final = n2g.distill(_seven_unless_after_blocker, x)
    assert final.refit_ and not scored.refit_
    assert final.scores_ == scored.scores_  # both report the fit on the training side, scored on held-out text
    assert [e.token_ids for e in final.examples_ if e.split == "test"] == \
        [e.token_ids for e in scored.examples_ if e.split == "test"]
    probe = text(77, [[7], [20, 7], [21, 7]], n=60, rate=0.3)
    true = _seven_unless_after_blocker(probe).numpy()
    blocked = (probe == 7) & (shifted(probe, 1) == 21)
    assert int(blocked.sum()) >= 10
    assert (scored.predict_normalised(probe)[blocked] >= 0.5).all()  # never saw 21 before 7: fires
    assert score_arrays([true], [final.predict_normalised(probe)]).f1 == 1.0  # learned it from the held-out side
    assert "refit on every excerpt" in repr(final) and "refit" not in repr(scored)
    # The final fit's training examples (whose order the paths' sources follow) take in held-out excerpts.
    assert {e.excerpt_index for e in final.examples_ if e.split == "train"} & set(held.tolist())


def test_a_context_one_excerpt_proposed_counts_out_of_sample_where_other_excerpts_show_it_firing():
    # "7 fires after 20, 21 or 22": pruning made each context path from one top excerpt (0, 1, 2); training
    # excerpts 3-5 show the same contexts firing, 6 shows "23 7" firing (a context no path has) and 7-16 show
    # "50 7" quiet. The END quantile is chosen out of sample on a top-like mix (0, 1, 2, 6 and two quiet
    # ones). Before, each context path counted as unknown to its own excerpt, so every firing token of the
    # mix fell back to bare 7, which then had to fire (quantile 1.0: "7 fires anywhere"; branch pruning then
    # drops the contexts). The training text shows those contexts firing in other excerpts: they count.
    g = NeuronGraph()
    for k, c in enumerate((20, 21, 22)):
        g.add_path([(7, 1.0), (c, 1.0)], 1.0, k)
    rows = [([c, 7], [0.0, 1.0]) for c in (20, 21, 22, 20, 21, 22, 23)] + [([50, 7], [0.0, 0.1])] * 10
    g.calibrate(rows, backoff=True, statistic="auto", min_count=1, sources=list(range(len(rows))),
                end_value="mean", select=[0, 1, 2, 6, 7, 8], subtree=True)
    seven = g.nodes[0].children[7]
    assert g.nodes[seven].end < 0.5  # bare 7 stays quiet: 1 firing token in 11 reach it
    assert all(g.nodes[g.nodes[seven].children[c]].end == 1.0 for c in (20, 21, 22))
    assert [g.nodes[g.nodes[seven].children[c]].sources for c in (20, 21, 22)] == [{0}, {1}, {2}]  # as made
    # Without the other excerpts (rows 3-5 quiet background instead), the mix cannot tell: 7 fires alone.
    rows[3:6] = [([50, 7], [0.0, 0.1])] * 3
    h = NeuronGraph()
    for k, c in enumerate((20, 21, 22)):
        h.add_path([(7, 1.0), (c, 1.0)], 1.0, k)
    h.calibrate(rows, backoff=True, statistic="auto", min_count=1, sources=list(range(len(rows))),
                end_value="mean", select=[0, 1, 2, 6, 7, 8], subtree=True)
    assert h.end_quantile == 1.0 and h.nodes[h.nodes[0].children[7]].end >= 0.5


def test_a_graph_claiming_millions_of_end_values_loads_as_counts_not_a_list_of_them(tmp_path):
    # an END's count is how many training values set it; a run folder from anyone may claim 2^25 of them,
    # and the server keeps 256 graphs loaded: 256 MB each as a list of that many floats
    import tracemalloc

    from n2g.graph import MAX_END_COUNT

    fitted = n2g.distill(SEVEN, GOOD).graph_
    path = fitted.save(tmp_path / "graph.json")
    d = json.loads(path.read_text())
    ends = [n for n in d["graph"]["nodes"] if n["kind"] == "end"]
    ends[0]["count"] = MAX_END_COUNT - 1 - sum(n["count"] for n in ends[1:])
    path.write_text(json.dumps(d))
    tracemalloc.start()
    graph = NeuronGraph.load(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, peak  # the list alone would be 512 MB
    assert graph.n_paths() == MAX_END_COUNT - 1
    assert graph.predict_sequence([9, 7, 3]).tolist() == fitted.predict_sequence([9, 7, 3]).tolist()
    again = NeuronGraph.load(graph.save(tmp_path / "again.json"))  # saved with the same count
    assert json.loads((tmp_path / "again.json").read_text())["graph"] == d["graph"] and again.n_paths() == graph.n_paths()
    small = NeuronGraph.load(fitted.save(tmp_path / "small.json"))  # a path added to a loaded END joins its values
    (node,) = [n for n in small.nodes if n.end is not None]
    small.add_path([(node.token_id, 1.0)], 0.25)
    assert len(node.end_values) == 11 and node.end_values[:10] == [node.end_values[0]] * 10


def test_describe_counts_in_the_singular_where_there_is_one():
    graph = NeuronGraph()
    graph.add_path([(5, 1.0), (WILDCARD, 0.5), (6, 0.9)], 0.8)
    head = graph.describe().splitlines()[0]
    assert head == "NeuronGraph graph: 1 activating token, 1 context, 1 wildcard node, 1 path (fires at >= 0.5)", head
