"""The HTML report, rendered in headless Chromium: tables and images present, no image broken."""

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from protonmf import PrototypeModel
from protonmf.data import Preprocess, make_source
from protonmf.evaluation.held_out import evaluate_model
from protonmf.viz.prototype_figures import PROTOTYPE_COLORS
from protonmf.viz.report import render_report
from tests.prototypes.small_published import N_CLASSES, published_run

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The report of a model published by a run's steps (so it has a gallery), 3 synthetic classes."""
    root = tmp_path_factory.mktemp("report")
    _, _, _, uri = published_run(root)
    model = PrototypeModel.load(uri)
    source = make_source("synthetic", n_classes=N_CLASSES, n_per_class=4, split="val", image_size=64)
    train = make_source("synthetic", n_classes=N_CLASSES, n_per_class=6, split="train", image_size=64)  # the run's training images
    evaluation = evaluate_model(model, source, Preprocess(**model.preprocess), train=train)
    recon = {p: {k: {"mean": 0.1 / p, "std": 0.01} for k in ("feature_error", "baseline_feature_error", "head_error", "baseline_head_error", "stability")} for p in (1, 3, 5)}
    html = render_report(model, evaluation, source, reconstruction=recon, classes=[0, 1], images_per_class=4)
    path = root / "index.html"
    path.write_text(html)
    return path, evaluation


def _near(png: bytes, colour, tol: float = 40.0) -> int:
    """Pixels of a screenshot within ``tol`` (RGB, 0–255) of ``colour`` (RGB in [0, 1])."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(float)
    return int((np.linalg.norm(pixels - np.asarray(colour[:3]) * 255, axis=-1) < tol).sum())


def test_report_renders_in_headless_chromium(page):
    assert CHROMIUM and CHROMEDRIVER, "the test set-up installs Debian's chromium and chromium-driver (make test)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        path, evaluation = page
        driver.get(path.as_uri())
        headings = [h.text for h in driver.find_elements("tag name", "h2")]
        intervention = evaluation["intervention"]
        nothing = all(v["top1_before"] == 1 and v["fixed"] == 0 for v in intervention.values())
        assert headings == ["Accuracy", "Which prototypes carry the decision", "Removing a prototype (test-time intervention)",
                            "Part localization", "Do the gallery and the heatmaps agree", "Consistency and stability",
                            "How well the prototypes rebuild the features and the head",
                            "The prototypes of 2 of the 3 classes (p = 3)", "The same images with more prototypes"], headings
        text = driver.find_element("tag name", "body").text
        for paper in ("Table 3", "Table 4", "Table 1 and Figure 5", "Figures 2–3", "Figure 4"):
            assert f"the paper's {paper}" in text, paper
        intro = driver.find_element("css selector", ".intro").text
        for said in ("prototypes", "coefficient a", "residual", "contribution", "negative"):
            assert said in intro, said
        tables = driver.find_elements("tag name", "table")
        # accuracy, Table 3, Table 4 (one line instead when there is nothing to correct), localization, agreement,
        # consistency, Table 1
        assert len(tables) == (6 if nothing else 7)
        if nothing:
            assert "The black box makes no mistake on these held-out images" in text
        agreed = [td.text for td in tables[3 if nothing else 4].find_elements("tag name", "td")]
        assert agreed[:3] == ["1", f"{evaluation['agreement'][1]['score']:.1f}", f"{evaluation['agreement'][1]['n_prototypes']}"]
        cells = [td.text for td in tables[4 if nothing else 5].find_elements("tag name", "td")]
        assert cells[:5] == ["1"] + [f"{v:.1f}" for v in (
            evaluation["consistency"][1]["codes"], evaluation["stability"][1]["codes"],
            evaluation["consistency"][1]["presence"], evaluation["consistency"][1]["activation"])]
        first = tables[0].find_elements("tag name", "td")
        assert first[1].text == f"{evaluation['top1_black_box']:.4f}"
        images = driver.find_elements("tag name", "img")
        # Figure 5; per class: coefficients, per prototype its heatmaps and its gallery, the residual; Figure 4
        assert len(images) == 1 + 2 * (1 + 3 * 2 + 1) + 1
        broken = driver.execute_script(
            "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0 || i.naturalHeight === 0).map(i => i.alt)"
        )
        assert broken == []
        legends = [e.text for e in driver.find_elements("css selector", ".legend")]
        assert len(legends) == 2 and all(f"prototype {i}: a = " in t for t in legends for i in range(3)), legends
        panels = driver.find_elements("css selector", ".prototype-panel[data-prototype]")
        assert len(panels) == 2 * 3
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1200, height + 100)
        shot = path.parent / "screenshot.png"
        driver.save_screenshot(str(shot))
        for i in range(3):  # the whole page too: every prototype's colour is on the screen
            assert _near(shot.read_bytes(), PROTOTYPE_COLORS[i]) > 500
        driver.set_window_size(1200, 900)
        for n, panel in enumerate(panels):
            i = n % 3
            head = panel.find_element("css selector", ".panel-head").text
            assert head.startswith(f"prototype {i} · coefficient a = ")
            share = evaluation["agreement"][3]["per_class"][n // 3][i]  # one prototype's agreement, beside its pictures
            assert head.endswith(f" · {share:.0f}% of its gallery on the part its heatmaps peak on most often"), head
            for what in ("presence", "top training patches"):
                img = panel.find_element("css selector", f"img[alt$='prototype {i} of class {n // 3}: {what}']")
                driver.execute_script("arguments[0].scrollIntoView()", img)
                shot = img.screenshot_as_png  # what Chromium drew, not the PNG we embedded
                own, others = _near(shot, PROTOTYPE_COLORS[i]), [_near(shot, PROTOTYPE_COLORS[j]) for j in range(3) if j != i]
                assert own >= 10 and own > 5 * max(others), (n, what, own, others)  # drawn in its own colour, not another's
    finally:
        driver.quit()


def test_the_reports_figure_labels_are_at_least_12_pixels_high():
    """The heatmap and gallery strips' numbers, at the report's resolution
    (they were 7-8 pt, 9-10 px, beside the page's 16 px text)."""
    import numpy as np
    from matplotlib.text import Text

    from protonmf.viz.png import REPORT_DPI
    from protonmf.viz.prototype_figures import patch_strip, presence_strip

    images, heat = np.random.default_rng(0).random((3, 16, 16, 3)), np.random.default_rng(1).random((3, 16, 16))
    figures = [presence_strip(images, heat, (0.1, 0.4, 0.7), [1.0, 2.0, 3.0]),
               patch_strip([(images[0], (2, 2, 8, 8), 5.2)] * 2, (0.1, 0.4, 0.7), 2)]
    for fig in figures:
        fig.canvas.draw()
        texts = [t for t in fig.findobj(Text) if t.get_text().strip() and t.get_visible()]
        assert texts and min(t.get_fontsize() for t in texts) * REPORT_DPI / 72 >= 12
