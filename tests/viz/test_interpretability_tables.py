"""Consistency and stability reach the HTML report and the flow's run summary, with their numbers."""

from protonmf.viz.summaries import interpretability_markdown as _interpretability_table
from protonmf.viz.report import _evaluation_tables

EVALUATION = {
    "n_images": 4, "top1_black_box": 1.0, "top1_prototype": 1.0, "max_abs_logit_diff": 0.0, "max_abs_logit": 1.0,
    "table3": {3: {"nmf_only": 1.0, "residual_only": 0.5, "augmented": 1.0}},
    "consistency": {3: {"codes": 76.5, "presence": 61.25, "activation": 95.5}, 1: {"codes": 70.0, "presence": 70.0, "activation": 92.5}},
    "stability": {3: {"codes": 94.25, "presence": 1.0, "activation": 2.0}, 1: {"codes": 92.5, "presence": 1.0, "activation": 2.0}},
}


def test_report_has_a_consistency_and_stability_table():
    html = "".join(_evaluation_tables(EVALUATION, 3))
    assert "<h2>Consistency and stability</h2>" in html
    assert "<tr><td>1</td><td>70.0</td><td>92.5</td><td>70.0</td><td>92.5</td></tr>" in html  # percentages to one place
    assert "<tr><td>3</td><td>76.5</td><td>94.2</td><td>61.2</td><td>95.5</td></tr>" in html
    assert "Consistency and stability" not in "".join(_evaluation_tables({k: v for k, v in EVALUATION.items() if k not in ("consistency", "stability")}, 3))


def test_run_summary_has_the_same_numbers():
    table = _interpretability_table(EVALUATION)
    assert "| 1 | 70.0 | 92.5 | 70.0 | 92.5 |\n| 3 | 76.5 | 94.2 | 61.2 | 95.5 |" in table
    assert _interpretability_table({"table3": {}}) == ""
