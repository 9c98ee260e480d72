import pytest

from skymask_lite.__main__ import main
from skymask_lite.experiments import run_name
from skymask_lite.studies import DECISION_ALPHA, DECISION_ATTACKS, DECISION_BIAS, STUDIES, study_configs


def test_decision_study_covers_its_grid_once():
    configs = study_configs("decision")
    assert len(configs) == 3 * (len(DECISION_BIAS) + len(DECISION_ALPHA)) * len(DECISION_ATTACKS)
    assert len({run_name(c) for c in configs}) == len(configs)  # one file per run
    for config in configs:
        config.validate()
        assert config.defense == "skymask" and config.rounds == 5
        assert config.defense_options == {"record_geometry": True}
        assert (config.num_malicious == 0) == (config.attack == "none")
    splits = {(c.split, c.bias if c.split == "bias" else c.alpha) for c in configs}
    assert splits == {("bias", q) for q in DECISION_BIAS} | {("dirichlet", a) for a in DECISION_ALPHA}


def test_unknown_study_names_the_choices():
    with pytest.raises(ValueError, match="decision"):
        study_configs("nope")
    assert set(STUDIES) >= {"decision"}


def test_study_command_checks_its_folder_before_any_run(capsys):
    assert main(["study", "decision", "--out-dir", "/proc/skymask-nope"]) == 2
    assert "--out-dir" in capsys.readouterr().err


def test_skymask_study_names_the_committed_files():
    """The study recomputes exactly the committed skymask/ runs (same run identity, same file)."""
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "data" / "results" / "skymask"
    names = {f"{run_name(c)}.json" for c in study_configs("skymask")}
    assert names == {p.name for p in folder.glob("*.json")}
