"""The command line without Ray or Prefect: what `protonmf evaluate` asks for."""

import pytest

from flows.cli import main


def test_evaluate_without_data_of_a_model_that_records_none(resnet_model, tmp_path):
    """A model saved outside a run (or published before runs recorded their data) names what to give."""
    resnet_model.save(str(tmp_path / "model"))
    with pytest.raises(SystemExit, match=r"^evaluate: give --val IMAGEFOLDER_URI or --config CONFIG for the held-out "
                                         rf"images \(the model at {tmp_path}/model does not record its run's held-out data\)$"):
        main(["evaluate", str(tmp_path / "model"), "--device", "cpu"])


def test_classes_that_failed_with_the_projects_errors_are_named_in_one_message(monkeypatch, capsys):
    """An extraction whose classes failed apart (tasks.extract.ClassesFailed) ends the command with
    its message and each error, not a traceback; any other error in the group is raised."""
    import flows.cli
    from protonmf.data.store import StoreError
    from tasks.extract import ClassesFailed

    failed = ClassesFailed.of({1: StoreError("class 1 is damaged"), 3: ValueError("no image")}, ["a", "b", "c", "d"], 4)
    monkeypatch.setattr(flows.cli, "_run", lambda config, overrides: (_ for _ in ()).throw(failed))
    assert main(["run", "configs/demo.yaml"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "protonmf: error: extraction failed for 2 of 4 classes: 1 ('b'), 3 ('d'); the other classes are in the store, "
        "and a retry or a rerun extracts only these",
        "  class 1 is damaged",
        "  no image",
    ]
    bug = ClassesFailed.of({0: TypeError("a bug")}, ["a"], 1)
    monkeypatch.setattr(flows.cli, "_run", lambda config, overrides: (_ for _ in ()).throw(bug))
    with pytest.raises(ClassesFailed):
        main(["run", "configs/demo.yaml"])
