"""protonmf explain: numbers that add up, pictures that open, interventions that remove a contribution."""

import json

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from protonmf.prototypes.explain_images import parse_interventions


@pytest.fixture(scope="module")
def saved(resnet_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    model = resnet_model.with_mode("augmented")  # a copy: the session fixture stays as it is
    model.preprocess = {"resize": 64, "crop": 64, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    model.save(str(root / "model"))
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def test_explain_writes_numbers_and_pictures(saved, capsys):
    images = [str(saved / "img0.png"), str(saved / "img1.png"), str(saved / "broken.jpg")]
    out = saved / "out"
    code = main(["explain", str(saved / "model"), *images, "--out", str(out), "--intervene", "class2:1,0:0"])
    assert code == 2  # one input is not an image: explained are the others, and the command says so
    captured = capsys.readouterr()
    assert captured.err.strip() == (f"protonmf: error: explain: 1 of 3 input(s) not explained: {saved / 'broken.jpg'}: "
                                    + json.loads((out / "explanations.json").read_text())[2]["skipped"])
    assert "prototypes" in captured.out
    results = json.loads((out / "explanations.json").read_text())
    assert results[2]["skipped"].startswith("not an image")
    for r in results[:2]:
        m = r["model"]
        total = sum(m["contributions"]) + m["bias"] + (0 if m["residual_spread_over_prototypes"] else m["residual"])
        assert total == pytest.approx(m["logit"], abs=1e-4)
        assert len(m["contributions"]) == 3 and 0 < m["probability"] <= 1
        picture = Image.open(m["picture"])
        assert picture.size[0] > 400 and picture.size[1] > 600  # a header row and a row per prototype
        e = r["intervened"]
        c = m["predicted_class"]
        removed = {2: [1], 0: [0]}.get(c, [])
        if e["predicted_class"] == c:
            for i in removed:
                assert e["contributions"][i] == 0.0
            assert e["logit"] == pytest.approx(m["logit"] - sum(m["contributions"][i] for i in removed), abs=1e-4)


def test_parse_interventions():
    assert parse_interventions("3:1, goldfish:0,3:2") == {"3": [1, 2], "goldfish": [0]}
    with pytest.raises(ValueError, match="expects CLASS:PROTO"):
        parse_interventions("3")
    with pytest.raises(ValueError, match="is not a number"):
        parse_interventions("3:x")
