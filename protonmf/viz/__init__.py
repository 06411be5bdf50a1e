"""Figures and pages: prototype figures, concept figures and sheets, explanations written out, the HTML
reports, and the one rendering of an evaluation (:mod:`~protonmf.viz.summaries`).

The names below are imported on first use (matplotlib is slow to import, and the flows need only
:mod:`~protonmf.viz.summaries`)."""

from protonmf.lazy import lazy_exports

#: Each public name and the module that defines it.
_HOMES = {
    "EvaluationTable": "summaries",
    "PROTOTYPE_COLORS": "prototype_figures",
    "attribution_overlays": "concept_figures",
    "class_figures": "concept_sheets",
    "colour_hex": "prototype_figures",
    "concept_sheet": "concept_figures",
    "concept_tree": "concept_figures",
    "draw_patches": "prototype_figures",
    "error_curves": "prototype_figures",
    "evaluation_lines": "summaries",
    "evaluation_markdown": "summaries",
    "evaluation_tables": "summaries",
    "explain_images": "explanations",
    "explanation_figure": "prototype_figures",
    "fidelity_curves": "concept_figures",
    "figure_png": "png",
    "importance_bars": "concept_figures",
    "interpretability_markdown": "summaries",
    "localization_markdown": "summaries",
    "mean_fidelity_figure": "concept_sheets",
    "patch_strip": "prototype_figures",
    "png_data_uri": "png",
    "presence_overlay": "prototype_figures",
    "presence_strip": "prototype_figures",
    "prototype_colour": "prototype_figures",
    "prototype_overlay": "prototype_figures",
    "render_craft_page": "report",
    "render_report": "report",
}

__getattr__, __all__ = lazy_exports(__name__, _HOMES)
