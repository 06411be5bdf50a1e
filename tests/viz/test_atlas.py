"""The prototype atlas: a page per class and p, searchable from its index, light at 1,000 classes,
browsed in headless Chromium (search a class, open its page, see its prototype panels)."""

import io
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from protonmf import PrototypeModel
from protonmf.backbones.feature_backbone import FeatureBackbone
from protonmf.backbones.nets import SmallCNN
from protonmf.prototypes.fit import fit_classes
from protonmf.prototypes.gallery import GALLERY_SCHEMA
from protonmf.viz.atlas import atlas_weights, class_page_name, write_atlas
from protonmf.viz.prototype_figures import PROTOTYPE_COLORS

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
K, PS = 1000, [3, 1]


def _patch(colour) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((24, 24, 3), colour, dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def thousand(tmp_path_factory):
    """A model of 1,000 classes (the small CNN's head, prototypes fitted on random non-negative
    features) with a gallery of 2 patches per prototype, and its atlas."""
    torch.manual_seed(0)
    backbone = FeatureBackbone.from_model(SmallCNN(num_classes=K, width=8))
    D = backbone.V.shape[1]
    features = [torch.rand(2, 2, 2, D) for _ in range(K)]
    fits = fit_classes(features, backbone.V, backbone.bias, PS, max_iter=20)
    patches = [_patch((255 * np.asarray(PROTOTYPE_COLORS[i][:3])).astype(np.uint8)) for i in range(3)]
    rows = {name: [] for name in GALLERY_SCHEMA.names}
    for p in PS:
        for k in range(K):
            for i in range(p):
                for rank in range(2):
                    for name, value in (("p", p), ("class_idx", k), ("prototype", i), ("rank", rank), ("score", 1.0),
                                        ("row", 0), ("image_id", f"{k}/{rank}"), ("uri", f"mem://{k}/{rank}"), ("x0", 0.0),
                                        ("y0", 0.0), ("x1", 8.0), ("y1", 8.0), ("patch_jpeg", patches[i]),
                                        ("cell_x0", 0.0), ("cell_y0", 0.0), ("cell_x1", 8.0), ("cell_y1", 8.0)):
                        rows[name].append(value)
    gallery = pa.table(rows, schema=GALLERY_SCHEMA)
    names = [f"n{k:08d} class number {k}" for k in range(K)]
    model = PrototypeModel.from_prototypes(backbone, [fits[p] for p in PS], names, gallery=gallery)
    out = tmp_path_factory.mktemp("atlas") / "atlas"
    write_atlas(model, str(out), images_per_class=0)
    return model, out


def test_every_class_has_a_page_at_every_p_and_the_pages_stay_light(thousand):
    model, out = thousand
    weights = atlas_weights(str(out))
    assert weights["pages"] == K * len(PS)
    assert weights["index"] < 2_000_000 and weights["largest_page"] < 1_000_000, weights
    page = (out / "classes" / class_page_name(42, 3)).read_text()
    assert page.count("class='panel'") == 3 and f"href='{class_page_name(42, 1)}'" in page
    assert f"coefficient a = {model.C[42][0].item():.3g}" in page


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="make test installs chromium and chromium-driver")
def test_search_a_class_open_its_page_and_see_its_prototypes(thousand):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    _, out = thousand
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_window_size(1200, 900)
        driver.get((out / "index.html").as_uri())
        driver.find_element("id", "search").send_keys("number 777")
        shown = [li for li in driver.find_elements("css selector", ".classes li") if li.is_displayed()]
        assert [li.find_element("tag name", "a").text for li in shown] == ["n00000777 class number 777"]
        assert driver.find_element("id", "count").text == f"1 of {K} classes"
        shown[0].find_element("tag name", "a").click()
        assert driver.title == "n00000777 class number 777 · p = 3"
        panels = driver.find_elements("css selector", ".panel")
        assert len(panels) == 3
        sizes = driver.execute_script("return Array.from(document.images).map(i => [i.naturalWidth, i.naturalHeight])")
        assert len(sizes) == 3 * 2 and all(w > 0 and h > 0 for w, h in sizes), sizes
        shot = out.parent / "atlas-777.png"
        driver.save_screenshot(str(shot))
        pixels = np.asarray(Image.open(shot).convert("RGB")).astype(float)
        for i in range(3):  # each prototype's patches and border in its own colour, on the screen
            near = np.linalg.norm(pixels - np.asarray(PROTOTYPE_COLORS[i][:3]) * 255, axis=-1) < 40
            assert near.sum() > 500, i
        driver.find_element("link text", "p = 1").click()
        assert len(driver.find_elements("css selector", ".panel")) == 1
        driver.find_element("link text", "all classes").click()
        driver.find_element("id", "search").send_keys("12")
        assert driver.find_element("id", "count").text.endswith(f" of {K} classes")
    finally:
        driver.quit()


def test_a_published_runs_atlas_has_held_out_heatmaps(tmp_path):
    from protonmf.data import Preprocess, make_source
    from tests.prototypes.small_published import N_CLASSES, published_run

    _, _, _, uri = published_run(tmp_path)
    model = PrototypeModel.load(uri)
    from protonmf.evaluation.held_out import evaluate_model

    source = make_source("synthetic", n_classes=N_CLASSES, n_per_class=4, split="val", image_size=64)
    train = make_source("synthetic", n_classes=N_CLASSES, n_per_class=6, split="train", image_size=64)
    evaluation = evaluate_model(model, source, Preprocess(**model.preprocess), train=train)
    write_atlas(model, str(tmp_path / "atlas"), source=source, preprocess=Preprocess(**model.preprocess), images_per_class=2,
                evaluation=evaluation)
    page = (tmp_path / "atlas" / "classes" / class_page_name(1, 3)).read_text()
    assert page.count("held-out heatmap") == 3 * 2 and page.count("training patch") == 3 * model.settings["gallery"]
    assert "mean contribution to the logit" in page
    for i, share in enumerate(evaluation["agreement"][3]["per_class"][1]):  # each prototype's agreement on its panel
        assert f"prototype {i} · coefficient a = " in page
        assert f"{share:.0f}% of its gallery on the part its heatmaps peak on most often" in page


def test_protonmf_atlas_writes_any_published_models_atlas(tmp_path, capsys):
    from flows.cli import main
    from tests.prototypes.small_published import N_CLASSES, published_run

    _, _, _, uri = published_run(tmp_path)
    assert main(["atlas", uri, "--out", str(tmp_path / "site"), "--images", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"atlas:            {tmp_path / 'site'}/index.html" in out and f"pages:            {N_CLASSES * 2} (" in out
    page = (tmp_path / "site" / "classes" / class_page_name(0, 1)).read_text()
    assert page.count("held-out heatmap") == 2  # the held-out data the model's manifest records


def test_an_atlas_cut_off_while_its_pages_are_written_has_no_index_and_a_rerun_completes_it(tmp_path, monkeypatch):
    import protonmf.viz.atlas as atlas

    torch.manual_seed(0)
    backbone = FeatureBackbone.from_model(SmallCNN(num_classes=5, width=8))
    fits = fit_classes([torch.rand(2, 2, 2, backbone.V.shape[1]) for _ in range(5)], backbone.V, backbone.bias, [2], max_iter=20)
    model = PrototypeModel.from_prototypes(backbone, [fits[2]], [f"class {k}" for k in range(5)])
    written, real = [], atlas.write_objects

    def cut_off(fs, objects):
        if len(written) == 3:
            raise OSError("connection reset")
        written.append(sorted(objects))
        real(fs, objects)

    monkeypatch.setattr(atlas, "PAGES_AT_ONCE", 2)
    monkeypatch.setattr(atlas, "write_objects", cut_off)
    out = tmp_path / "atlas"
    with pytest.raises(OSError, match="connection reset"):
        write_atlas(model, str(out), images_per_class=0)
    assert [len(w) for w in written] == [2, 2, 1]  # every page in blocks of 2 classes, then the index failed
    assert not (out / "index.html").exists() and len(list((out / "classes").iterdir())) == 5
    written.clear()
    monkeypatch.setattr(atlas, "write_objects", real)
    assert write_atlas(model, str(out), images_per_class=0) == f"{out}/index.html"
    assert (out / "index.html").exists() and sorted(p.name for p in (out / "classes").iterdir()) == [
        class_page_name(k, 2) for k in range(5)]
