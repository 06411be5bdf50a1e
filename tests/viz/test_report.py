"""The HTML report, rendered in headless Chromium: tables and images present, no image broken."""

import shutil

import pytest

from protonmf.data import make_source
from protonmf.evaluation.held_out import evaluate_model
from protonmf.viz.report import render_report

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def page(resnet_model, tmp_path_factory):
    model = resnet_model.with_mode("augmented")
    model.preprocess = {"resize": 64, "crop": 64, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    source = make_source("synthetic", n_classes=5, n_per_class=4, split="val", image_size=64)
    from protonmf.data import Preprocess

    evaluation = evaluate_model(model, source, Preprocess(**model.preprocess))
    recon = {p: {k: {"mean": 0.1 / p, "std": 0.01} for k in ("feature_error", "baseline_feature_error", "head_error", "baseline_head_error", "stability")} for p in (1, 3, 5)}
    html = render_report(model, evaluation, source, reconstruction=recon, classes=[0, 1], images_per_class=4)
    path = tmp_path_factory.mktemp("report") / "index.html"
    path.write_text(html)
    return path, evaluation


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
        for expected in ("Accuracy", "Table 3", "Table 4", "Part localization", "Consistency and stability",
                         "Table 1 / Figure 5", "Figures 2–3", "Figure 4"):
            assert any(expected in h for h in headings), (expected, headings)
        tables = driver.find_elements("tag name", "table")
        assert len(tables) == 6  # accuracy, Table 3, Table 4, part localization, consistency and stability, Table 1
        cells = [td.text for td in tables[4].find_elements("tag name", "td")]
        assert cells[:5] == ["1"] + [f"{v:.4f}" for v in (
            evaluation["consistency"][1]["presence"], evaluation["stability"][1]["presence"],
            evaluation["consistency"][1]["activation"], evaluation["stability"][1]["activation"])]
        first = tables[0].find_elements("tag name", "td")
        assert first[1].text == f"{evaluation['top1_black_box']:.4f}"
        images = driver.find_elements("tag name", "img")
        assert len(images) == 1 + 2 * 2 + 1  # Figure 5, two classes × (areas, coefficients), Figure 4
        broken = driver.execute_script(
            "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt)"
        )
        assert broken == []
    finally:
        driver.quit()
