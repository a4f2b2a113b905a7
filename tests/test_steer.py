"""Steering and attribution: clamping a neuron that writes towards a token raises that token."""

import json

import numpy as np
import pytest

from test_ablate import INDEX, LAYER, STRENGTH, planted
from test_pipeline import cli, tiny_dir  # noqa: F401  (tiny_dir is a fixture)

from n2g.steer import attribution, steer


def test_clamping_a_neuron_that_writes_towards_a_token_raises_it():
    model = planted()
    nine = model.token_strings([9])[0]
    result = steer(model, LAYER, INDEX, [10, 11, 12], 100 * STRENGTH, n_tokens=4)
    top, before, after = result.gainers[0]
    assert top == nine and after > 1.5 * before  # (a tiny random model spreads probability almost evenly)
    assert nine in [t for t, _ in model.output_effects(LAYER, INDEX, k=5)[0]]
    assert result.promoted_overlap >= 1 and result.kl > 0
    assert result.after == nine * 4 and result.before != result.after  # clamped, the model says "9" again and again
    calm = steer(model, LAYER, INDEX, [10, 11, 12], 0.0, n_tokens=4)  # clamped to what it already is there
    assert calm.kl == pytest.approx(0.0, abs=1e-6)


def test_a_clamp_below_zero_counts_the_gainers_among_the_tokens_that_direction_promotes():
    # the neuron writes towards "9": held far below 0 it pushes "9" down and the tokens it suppresses up, so its
    # gainers are among its most suppressed tokens (the overlap was counted with its promoted ones: 0 of 10)
    model = planted()
    promoted, suppressed = ({t for t, _ in side} for side in model.output_effects(LAYER, INDEX, k=50))
    down = steer(model, LAYER, INDEX, [10, 11, 12], -100 * STRENGTH, n_tokens=1)
    gained = {t for t, _, _ in down.gainers}
    assert model.token_strings([9])[0] in [t for t, _, _ in down.losers[:3]]
    assert down.promoted_overlap == len(gained & suppressed) >= 5 and not gained & promoted
    up = steer(model, LAYER, INDEX, [10, 11, 12], 100 * STRENGTH, n_tokens=1)
    assert up.promoted_overlap == len({t for t, _, _ in up.gainers} & promoted) >= 5


def test_steering_check_of_a_negative_side_in_a_run(tiny_dir, tmp_path):
    # a .neg neuron is clamped to 4 x its most negative value; its page says so, and counts its gainers among the
    # tokens a fall in its activation promotes (its most suppressed ones), as n2g.steer does for a value below 0
    from test_pipeline import run_args

    from n2g.models import load_model

    out = tmp_path / "run"
    args = [a for a in run_args(tiny_dir, out, "--neurons", "0", "--layers", "1", "--sign", "negative", "--ablation")
            if a != "--no-report"]
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    result = json.loads((out / "neurons" / "L1.N0.neg" / "result.json").read_text())
    steering = result["steering"]
    assert steering["value"] == pytest.approx(-4.0 * result["stats"]["max_activation"], rel=1e-5)
    model = load_model(str(tiny_dir / "model"))
    promoted, suppressed = ({t for t, _ in side} for side in model.output_effects(1, 0, k=50))
    gained = {t for t, _, _ in steering["gainers"]}
    assert steering["promoted_overlap"] == len(gained & suppressed) != len(gained & promoted)
    page = (out / "viewer" / "neurons" / "L1.N0.neg.html").read_text()
    assert "clamped to 4 × its most negative value" in page and "weights suppress most" in page


def test_attribution_is_where_the_neuron_is_active_and_points_to_its_token():
    model = planted()
    attr = attribution(model, LAYER, INDEX, [10, 7, 11, 7], 9)
    assert attr.shape == (4,)
    assert attr[0] == 0.0 and attr[2] == 0.0  # activation 0 there: no attribution
    assert attr[3] > 0  # active on the last token, and it pushes "9" up
    assert np.all(np.isfinite(attr))


def test_steer_command(tiny_dir):
    model = str(tiny_dir / "model")
    res = cli("steer", "--model", model, "--layer", "1", "--neuron", "3", "--prompt", "the cat sat", "--max", "2",
              "--scale", "8", "--tokens", "3", "--json", "-q")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["value"] == pytest.approx(16.0) and len(out["gainers"]) == 10 and out["max_from"] == "--max"
    assert len(out["attribution"]["per_token"]) == 3
    text = cli("steer", "--model", model, "--corpus", str(tiny_dir / "corpus.txt"), "--excerpt-length", "32",
               "--layer", "1", "--neuron", "3", "--prompt", "the cat", "--tokens", "2", "-q")
    assert text.returncode == 0, text.stderr
    assert "scan of" in text.stdout and "top gainers" in text.stdout and "attribution to" in text.stdout


def test_steer_command_clamps_a_negative_side_to_a_multiple_of_its_most_negative_activation(tiny_dir):
    # `n2g steer` took the scan's maximum whatever the side: a .neg neuron could be clamped only by hand
    from n2g.corpus import Corpus
    from n2g.models import load_model
    from n2g.scan import scan_layers

    model = str(tiny_dir / "model")
    common = ["steer", "--model", model, "--corpus", str(tiny_dir / "corpus.txt"), "--excerpt-length", "32",
              "--layer", "1", "--neuron", "3", "--prompt", "the cat", "--tokens", "1", "-q"]
    res = cli(*common, "--sign", "negative", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    m = load_model(model)
    corpus = Corpus.build(str(tiny_dir / "corpus.txt"), m.encode, length=32)
    lowest = float(scan_layers(m, corpus.excerpts, [1], progress=False)[1].bot_val[0, 3])
    assert lowest < 0 and out["sign"] == "negative"
    assert out["max_activation"] == pytest.approx(lowest) and out["value"] == pytest.approx(4 * lowest)
    suppressed = {t for t, _ in m.output_effects(1, 3, k=50)[1]}
    assert out["promoted_overlap"] == len({t for t, _, _ in out["gainers"]} & suppressed)
    text = cli(*common, "--sign", "negative")
    assert text.returncode == 0, text.stderr
    assert f"most negative activation {lowest:.4g} (scan of" in text.stdout and f"= {4 * lowest:.4g} at" in text.stdout
    assert "most suppressed output tokens" in text.stdout
    wrong = cli(*common, "--sign", "negative", "--max", "2")
    assert wrong.returncode == 2 and "give --max -2" in wrong.stderr


@pytest.mark.parametrize("change, needle", [({"--scale": "lots"}, "--scale must be a number"),
                                           ({"--prompt": " ".join(["cat"] * 300)}, "context"),
                                           ({"--layer": "9"}, "does not exist"),
                                           ({"--max": "1e300", "--scale": "1e300"}, "range"),  # was NaN, --json traceback
                                           ({"--max": "1e39", "--json": None}, "range"),  # beyond float32: NaN
                                           ({"--max": None, "--corpus": "CORPUS", "--excerpt-length": "1000"},
                                            "longer than this model's context")])  # was scanned past the context
def test_steer_bad_input_is_one_line(tiny_dir, tmp_path, change, needle):
    options = {"--model": str(tiny_dir / "model"), "--layer": "1", "--neuron": "3", "--prompt": "the cat", "--max": "1",
               **change}
    if options.get("--corpus") == "CORPUS":
        options["--corpus"] = str(tiny_dir / "corpus.txt")
    args = [x for k, v in options.items() if k != "--max" or v is not None for x in (k, v) if x is not None]
    res = cli("steer", *args, "-q", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.startswith("n2g: error:")]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr and list(tmp_path.iterdir()) == []
