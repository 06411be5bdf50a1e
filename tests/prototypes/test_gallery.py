"""The gallery: the largest codes of each prototype on its training rows (the heatmaps' definition), their boxes, staged and published."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from protonmf import PrototypeModel
from protonmf.data import Preprocess
from scipy.optimize import nnls as scipy_nnls
from protonmf.prototypes.gallery import cell_box, gallery_table, patch_picture, top_codes
from tests.prototypes.small_published import N_CLASSES, published_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return published_run(tmp_path_factory.mktemp("gallery"))


def test_rows_are_the_largest_codes_of_the_fitted_prototypes_recomputed_on_the_stores_features(run):
    # Independent reference: scipy's NNLS of every stored feature row against the published B.
    config, store, _, uri = run
    model = PrototypeModel.load(uri)
    k = config.prototypes.gallery
    for p in config.prototypes.p:
        fit, table = model.with_p(p), model.gallery(p).to_pydict()
        for c in range(N_CLASSES):
            A = store.read_class(c).reshape(-1, store.dim).double().clamp_min(0).numpy()  # the class alone
            basis = fit.B[c].double().numpy()
            E = np.stack([scipy_nnls(basis.T, row)[0] for row in A])  # (n, p)
            for i in range(p):
                mine = [j for j, (cc, ii) in enumerate(zip(table["class_idx"], table["prototype"])) if (cc, ii) == (c, i)]
                expected = np.argsort(-E[:, i], kind="stable")[:k]
                expected = expected[E[expected, i] > 0]
                got = [table["row"][j] for j in mine]
                np.testing.assert_allclose([table["score"][j] for j in mine], E[expected, i], rtol=1e-4)
                # rows agree up to ties within float32 rounding of the scores
                assert set(got) == set(expected.tolist()) or np.allclose(E[got, i], E[expected, i], rtol=1e-4), (p, c, i)
                assert [table["rank"][j] for j in mine] == list(range(len(expected)))
    assert model.gallery(3).num_rows == N_CLASSES * 3 * k  # every prototype of the demo set is present somewhere


def test_a_gallery_patch_is_where_the_heatmap_of_its_own_image_puts_the_prototype(run):
    # One definition: the score of a gallery patch is the value, at its cell, of the map explain()
    # draws (prototype_maps' "codes") for that training image; eq. 9's presence map is another one.
    config, store, _, uri = run
    model = PrototypeModel.load(uri)
    top = [r for r in model.gallery().to_pylist() if r["rank"] == 0]
    h, w = store.grid
    differs = False
    for r in top:
        c, i = r["class_idx"], r["prototype"]
        image, cell = divmod(r["row"], h * w)
        F = store.read_class(c).reshape(-1, h, w, store.dim)[image : image + 1].float()  # (1, h, w, D)
        maps = model.prototype_maps(F, [c])
        assert maps["codes"][0, i].flatten()[cell].item() == pytest.approx(r["score"], rel=1e-4)
        assert maps["codes"][0, i].flatten().argmax().item() == cell  # the patch is the image's own peak
        differs |= not torch.allclose(maps["codes"], maps["presence"])
    assert differs


def test_a_rows_image_box_and_pixels_are_its_feature_cell(run):
    config, store, _, uri = run
    model = PrototypeModel.load(uri)
    row = model.gallery().slice(0, 1).to_pylist()[0]
    records = store.read_records([row["class_idx"]]).to_pylist()
    image, (x0, y0, x1, y1) = cell_box(row["row"], store.grid, 64)
    assert row["image_id"] == next(r["image_id"] for r in records if r["row"] == image)
    # resize 64 and crop 64 of a 64 × 64 image: the crop is the image, an 8 × 8 grid of 8-pixel cells
    h, w = store.grid
    cell = row["row"] % (h * w)
    assert (row["x0"], row["y0"], row["x1"], row["y1"]) == (8 * (cell % w), 8 * (cell // w), 8 * (cell % w) + 8, 8 * (cell // w) + 8)
    from protonmf.pipeline import make_split_source

    source = make_split_source(config, "train", labels=[row["class_idx"]])
    img = np.asarray(source.load(next(r for r in source.records if r.image_id == row["image_id"]))[0])
    picture = patch_picture(row["patch_jpeg"])  # the cell with one cell of context, JPEG
    ph, pw = picture.shape[:2]
    assert (ph, pw) == (24, 24) or row["x0"] in (0, 56) or row["y0"] in (0, 56)  # 3 × 3 cells, fewer at a border
    error = {(y, x): np.abs(picture.astype(int) - img[y:y + ph, x:x + pw]).mean()
             for y in range(64 - ph + 1) for x in range(64 - pw + 1)}
    # JPEG changes pixels a little: the picture is closest to the image where its box says, of every place
    assert min(error, key=error.get) == (int(row["y0"] - row["cell_y0"]), int(row["x0"] - row["cell_x0"]))


def test_a_cell_maps_back_through_resize_and_centre_crop_by_hand():
    """A 300 × 200 image, resize 256, crop 224: the image becomes 384 × 256, the crop starts at
    (80, 16); a 7 × 7 grid has 32-pixel cells. Cell (0, 0) of image 2 is crop box (0, 0, 32, 32),
    original (80·300/384, 16·200/256, 112·300/384, 48·200/256) = (62.5, 12.5, 87.5, 37.5)."""
    pre = Preprocess(resize=256, crop=224)
    image, box = cell_box(2 * 49 + 0, (7, 7), 224)
    assert (image, box) == (2, (0.0, 0.0, 32.0, 32.0))
    corners = pre.unmap_points(np.array([box[:2], box[2:]]), (300, 200))
    assert corners.tolist() == [[62.5, 12.5], [87.5, 37.5]]
    back, inside = pre.map_points(corners, (300, 200))
    assert back.tolist() == [[0.0, 0.0], [32.0, 32.0]] and inside.tolist() == [True, True]  # map_points undoes it
    # the same through gallery_table, which loads the image and cuts the patch from its crop
    codes = {1: top_codes(torch.zeros(1, 3 * 49, 1).index_put_((torch.tensor([0]), torch.tensor([2 * 49 + 8]), torch.tensor([0])), torch.tensor([1.0])),
                          torch.tensor([3 * 49]), 2)}
    import pyarrow as pa

    records = pa.table({"row": [0, 1, 2], "image_id": ["a", "b", "c"], "uri": ["u/a", "u/b", "u/c"]})
    pixels = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    table = gallery_table(codes, [7], [records], lambda iid: (Image.fromarray(pixels), None), pre, (7, 7)).to_pylist()
    assert len(table) == 1  # the other entries of E are 0: no gallery from them
    r = table[0]
    assert (r["image_id"], r["uri"], r["row"], r["score"]) == ("c", "u/c", 2 * 49 + 8, 1.0)
    # cell (1, 1): crop box (32, 32, 64, 64) → original (112·300/384, 48·200/256, 144·300/384, 80·200/256)
    assert (r["x0"], r["y0"], r["x1"], r["y1"]) == (87.5, 37.5, 112.5, 62.5)
    assert Image.open(io.BytesIO(r["patch_jpeg"])).size == (64, 64)  # 3 × 3 cells of 32 px, scaled to at most 64
    assert (r["cell_x0"], r["cell_y0"], r["cell_x1"], r["cell_y1"]) == (pytest.approx(64 / 3), pytest.approx(64 / 3),
                                                                         pytest.approx(128 / 3), pytest.approx(128 / 3))


def test_a_rerun_resumes_the_staged_gallery_and_a_refit_publishes_its_own(run, tmp_path):
    from protonmf.pipeline import Run, fit_prototype_group, publish_prototype_model

    config, store, fits, uri = run
    assert not any(f.resumed for f in fits)
    # A run that stopped after fitting: the staged gallery is read again, not recomputed.
    run2 = Run(config.model_copy(update={"storage": config.storage.model_copy(update={"model": str(tmp_path / "m2")})}))
    fit_prototype_group(run2, [0, 1])
    fs, staging = run2.fit.fs, run2.fit.folder
    staged = {p: fs.info(p)["mtime"] for p in fs.ls(staging, detail=False)}
    assert len(staged) == 2  # the group's fit and its gallery
    again = fit_prototype_group(run2, [0, 1])
    assert again.resumed and {p: fs.info(p)["mtime"] for p in fs.ls(staging, detail=False)} == staged
    fit_prototype_group(run2, [2])
    publish_prototype_model(run2)
    assert PrototypeModel.load(str(tmp_path / "m2")).gallery(3).equals(PrototypeModel.load(uri).gallery(3))
    # Another gallery size is another fit key: refit, and the published gallery follows it.
    run3 = Run(run2.config.model_copy(update={"prototypes": run2.config.prototypes.model_copy(update={"gallery": 2})}))
    assert run3.fit.key != run2.fit.key
    for g in ([0, 1], [2]):
        assert not fit_prototype_group(run3, g).resumed
    publish_prototype_model(run3)
    small = PrototypeModel.load(str(tmp_path / "m2")).gallery(3)
    assert small.num_rows == N_CLASSES * 3 * 2 and set(small["rank"].to_pylist()) == {0, 1}
    assert PrototypeModel.load(str(tmp_path / "m2")).settings["gallery"] == 2


def test_the_gallery_goes_with_derived_and_saved_models_and_is_absent_from_in_memory_fits(run, tmp_path, resnet_model):
    _, _, _, uri = run
    model = PrototypeModel.load(uri)
    assert model.with_p(1).gallery().equals(model.gallery(1)) and model.with_p(1).gallery()["p"].to_pylist() == [1] * (N_CLASSES * 5)
    edited = model.intervene({0: [1]})  # keeps only p = 3; its gallery with it
    edited.save(str(tmp_path / "edited"))
    again = PrototypeModel.load(str(tmp_path / "edited"))
    assert again.gallery().equals(model.gallery())
    with pytest.raises(ValueError, match="p = 1 was not fitted"):
        again.gallery(1)
    with pytest.raises(ValueError, match="this model has no gallery"):
        resnet_model.gallery()


def test_explain_draws_each_prototype_beside_its_gallery(run, tmp_path):
    """protonmf explain on a training image of class 0: its picture shows every prototype's colour
    and, per prototype, the gallery the artifact holds; the JSON gives the gallery's numbers."""
    import json

    from flows.cli import main
    from protonmf.pipeline import make_split_source
    from protonmf.viz.prototype_figures import PROTOTYPE_COLORS

    config, _, _, uri = run
    source = make_split_source(config, "train", labels=[0])
    img, _ = source.load(source.records_of(0)[0])
    img.save(tmp_path / "bird.png")
    assert main(["explain", uri, str(tmp_path / "bird.png"), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "out" / "explanations.json").read_text())[0]["model"]
    c = result["predicted_class"]
    table = PrototypeModel.load(uri).gallery().to_pylist()
    assert [[g["image_id"] for g in proto] for proto in result["gallery"]] == [
        [r["image_id"] for r in table if r["class_idx"] == c and r["prototype"] == i] for i in range(3)]
    assert result["gallery"][0][0]["box"] == [next(r[x] for r in table if (r["class_idx"], r["prototype"], r["rank"]) == (c, 0, 0))
                                             for x in ("x0", "y0", "x1", "y1")]
    pixels = np.asarray(Image.open(result["picture"]).convert("RGB")).astype(float)
    for i in range(3):
        near = (np.linalg.norm(pixels - PROTOTYPE_COLORS[i] * 255, axis=-1) < 30).sum()
        assert near > 300, (i, near)  # its label, heatmap frame and the outlines of its 5 patches


def test_a_fit_reads_the_record_tables_only_for_its_gallery(run, tmp_path, monkeypatch):
    """The gallery names images by their records; without it a fit reads each class's marker and
    chunks only (on S3 a request per class fewer), and its prototypes are the same."""
    from protonmf.data.store import FeatureStore
    from protonmf.pipeline import Run, fit_prototype_group

    config, store, _, uri = run
    tables: list[int] = []
    read_table = FeatureStore._read_table
    monkeypatch.setattr(FeatureStore, "_read_table", lambda self, k, marker: tables.append(k) or read_table(self, k, marker))
    fits = {}
    for gallery in (0, 2):
        update = {"prototypes": config.prototypes.model_copy(update={"gallery": gallery}),
                  "storage": config.storage.model_copy(update={"model": str(tmp_path / f"m{gallery}")})}
        tables.clear()
        fits[gallery] = fit_prototype_group(Run(config.model_copy(update=update)), [0, 1, 2])
        assert sorted(tables) == ([] if gallery == 0 else [0, 1, 2]), gallery
    assert fits[0].feature_error == fits[2].feature_error and fits[0].n_iter == fits[2].n_iter
