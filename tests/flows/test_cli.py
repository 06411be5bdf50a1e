"""The command line without Ray or Prefect: what `protonmf evaluate` asks for."""

import pytest

from flows.cli import main


def test_evaluate_without_data_of_a_model_that_records_none(resnet_model, tmp_path):
    """A model saved outside a run (or published before runs recorded their data) names what to give."""
    resnet_model.save(str(tmp_path / "model"))
    with pytest.raises(SystemExit, match=r"^evaluate: give --val IMAGEFOLDER_URI or --config CONFIG for the held-out "
                                         rf"images \(the model at {tmp_path}/model does not record its run's held-out data\)$"):
        main(["evaluate", str(tmp_path / "model"), "--device", "cpu"])
