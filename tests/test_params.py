"""Parameter files: every profile loads, and mistakes stop at once with the key named."""

from __future__ import annotations

import pytest
from conftest import ROOT, write_profile

from audiokd_lib.experiment.params import ParamsError, load_params


@pytest.mark.parametrize("profile", ["smoke", "quick", "full"])
def test_every_profile_loads(profile):
    params = load_params(ROOT / "params" / f"{profile}.yaml")
    assert params.profile == profile
    assert params.output_dir == ROOT / "outputs" / profile


def test_smoke_overrides_only_what_it_says():
    quick, smoke = load_params(ROOT / "params/quick.yaml"), load_params(ROOT / "params/smoke.yaml")
    assert smoke.data.notes.pitch_step > quick.data.notes.pitch_step
    assert smoke.features.n_mels == quick.features.n_mels
    assert smoke.augment == quick.augment


def test_misspelt_key_is_named_with_a_suggestion(tmp_path):
    path = write_profile(tmp_path, f"extends: {ROOT / 'params/quick.yaml'}\ndata:\n  notse: {{pitch_step: 2}}\n")
    with pytest.raises(ParamsError, match=r"unknown key 'data\.notse' \(did you mean 'notes'\?\)"):
        load_params(path)


def test_unknown_dataset_name_is_named(tmp_path):
    path = write_profile(tmp_path, f"extends: {ROOT / 'params/quick.yaml'}\ndata:\n  dataset: tinysoll\n")
    with pytest.raises(ParamsError, match=r"data\.dataset.*'rendered_notes'.*tinysoll"):
        load_params(path)


def test_inconsistent_front_end_is_refused(tmp_path):
    path = write_profile(tmp_path, f"extends: {ROOT / 'params/quick.yaml'}\nfeatures: {{f_max: 20000}}\n")
    with pytest.raises(ParamsError, match="Nyquist"):
        load_params(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="no such parameter file"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(write_profile(tmp_path, "data: [unclosed\n"))


def test_fingerprint_follows_the_section(tmp_path):
    base = load_params(ROOT / "params/quick.yaml")
    changed = load_params(write_profile(tmp_path, f"extends: {ROOT / 'params/quick.yaml'}\nfeatures: {{n_mels: 64}}\n"))
    assert base.fingerprint("features") != changed.fingerprint("features")
    assert base.fingerprint("data") == changed.fingerprint("data")
