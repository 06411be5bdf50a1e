"""Agreement of a prototype's gallery with its heatmaps, and a planted factorization where the parts are known."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from protonmf.evaluation.agreement import agreement, patch_parts
from protonmf.evaluation.interpretability import consistency, part_vectors, peak_locations
from protonmf.evaluation.localization import class_localization
from protonmf.nmf import nmf
from protonmf.prototypes.gallery import cell_box, top_codes
from protonmf.prototypes.where import prototype_codes


def _gallery(entries):
    """A gallery table with the columns agreement reads: (p, class, prototype, rank, image id, box)."""
    names = ["p", "class_idx", "prototype", "rank", "image_id", "x0", "y0", "x1", "y1"]
    return pa.table({n: [e[j] if j < 5 else e[5][j - 5] for e in entries] for j, n in enumerate(names)})


def test_patch_parts_and_agreement_count_by_hand():
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:4, :4] = 1  # part 1 top left
    mask[4:, 4:] = 2  # part 2 bottom right
    table = _gallery([
        (2, 0, 0, 0, "a", (0, 0, 4, 4)),  # on part 1
        (2, 0, 0, 1, "a", (4, 4, 8, 8)),  # on part 2
        (2, 0, 1, 0, "b", (4, 4, 8, 8)),  # on part 2
        (2, 0, 1, 1, "b", (3, 0, 8, 3.5)),  # centre (5.5, 1.75): background, though part 1 is in the box
        (2, 0, 1, 2, "gone", (0, 0, 4, 4)),  # an image without a mask: no part
        (2, 1, 0, 0, "a", (None, None, None, None)),  # an unreadable image: no box
    ])
    parts = patch_parts(table, lambda iid: None if iid == "gone" else mask, 2)[2]
    assert parts.shape == (2, 2, 3)
    assert parts[0].tolist() == [[1, 2, -1], [2, 0, -1]]
    assert parts[1].tolist() == [[-1, -1, -1], [-1, -1, -1]]
    result = agreement({0: [1, 0], 1: [2, 2]}, parts)
    assert result["per_class"][0] == [0.5, 0.5]
    assert all(math.isnan(s) for s in result["per_class"][1])  # no gallery: not counted
    assert result["score"] == 50.0 and result["n_prototypes"] == 2


def test_a_planted_factorization_gives_consistency_and_agreement_of_100():
    # Three parts with disjoint feature supports, each a 2x2 block of cells at a random place in
    # each image of an 8x8 grid; everything else is background (zero features). The NMF recovers
    # the parts (exactly, up to order and scale), so each prototype's map lights its part alone.
    gen = torch.Generator().manual_seed(0)
    h = w = 8
    D, P, N, S = 9, 3, 40, 64
    basis = torch.zeros(P, D)
    for j in range(P):
        basis[j, 3 * j : 3 * j + 3] = torch.rand(3, generator=gen) + 0.5
    F = torch.zeros(2 * N, h, w, D)
    masks = torch.zeros(2 * N, S, S, dtype=torch.int64)  # pixels: 8 px per cell
    keypoints = torch.zeros(2 * N, P, 2, dtype=torch.float64)
    cells = [(0, 0), (0, 4), (4, 0), (4, 4)]  # the four quadrants: parts never overlap
    for n in range(2 * N):
        order = torch.randperm(len(cells), generator=gen)[:P].tolist()
        for j, c in enumerate(order):
            y, x = cells[c][0] + int(torch.randint(0, 3, (1,), generator=gen)), cells[c][1] + int(torch.randint(0, 3, (1,), generator=gen))
            F[n, y : y + 2, x : x + 2] = basis[j] * (0.8 + 0.4 * torch.rand(2, 2, 1, generator=gen))
            masks[n, 8 * y : 8 * (y + 2), 8 * x : 8 * (x + 2)] = j + 1
            keypoints[n, j] = torch.tensor([8.0 * (x + 1), 8.0 * (y + 1)])
    train, held_out = F[:N], F[N:]
    res = nmf(train.reshape(-1, D), P, max_iter=500, tol=1e-8, seed=0)
    # where each prototype is, on held-out images: peaks on one part each, in every image
    maps = prototype_codes(held_out.reshape(N, h * w, D), res.B.unsqueeze(0).expand(N, P, D))  # (N, hw, p)
    maps = maps.transpose(1, 2).reshape(N, P, h, w)
    up = torch.nn.functional.interpolate(maps, size=(S, S), mode="nearest")
    loc = class_localization(up, masks[N:], P)
    assert sorted(loc["majority_part"]) == [1, 2, 3] and loc["purity"] == [1.0] * P and loc["coverage"] == 3
    o = part_vectors(peak_locations(maps, (S, S)), keypoints[N:], torch.ones(N, P, dtype=torch.bool), 10.3)
    assert consistency(o, torch.ones(N, P, dtype=torch.bool), torch.zeros(N, dtype=torch.int64))["score"] == 100.0
    # the gallery: the top of the same map over the training rows, every patch on its prototype's part
    codes = prototype_codes(train.reshape(1, -1, D), res.B.unsqueeze(0))
    top = top_codes(codes, torch.tensor([N * h * w]), 5)
    entries = []
    for i in range(P):
        for rank, r in enumerate(top.rows[0, i].tolist()):
            image, box = cell_box(r, (h, w), S)
            entries.append((P, 0, i, rank, str(image), box))
    parts = patch_parts(_gallery(entries), lambda iid: masks[int(iid)].numpy(), 1)[P]
    assert (parts >= 1).all()  # every patch lies on a part
    result = agreement({0: loc["majority_part"]}, parts)
    assert result["score"] == 100.0 and result["n_prototypes"] == P
    # Off by one prototype (its majority part swapped), the score says so: 2 of 3 agree.
    swapped = list(loc["majority_part"])
    swapped[0] = swapped[1]
    assert agreement({0: swapped}, parts)["score"] == pytest.approx(200 / 3)
