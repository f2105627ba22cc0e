"""Parameter files: every profile loads, and mistakes stop at once with the key named."""

from __future__ import annotations

import pytest
from conftest import ROOT, write_profile

from audiokd_lib.core.params import ParamsError, load_params


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


def test_command_line_overrides_are_typed_and_checked_by_the_schema():
    from audiokd_lib.core.params import expand_sweeps

    quick = ROOT / "params" / "quick.yaml"
    params = load_params(quick, ["kd.temperature=4", "train.epochs=30", "train.augment=[gain,noise]",
                                 "data.real_eval.dir=/some/folder"])
    assert (params.kd.temperature, params.train.epochs, params.train.augment) == (4.0, 30, ["gain", "noise"])
    assert params.data.real_eval.dir == "/some/folder" and params.profile == "quick"
    assert params.kd.alpha == load_params(quick).kd.alpha  # what is not set stays as the file says
    with pytest.raises(ParamsError, match=r"with --set kd\.temprature=4: unknown key 'kd\.temprature' \(did you mean "
                                          r"'temperature'\?\)"):
        load_params(quick, ["kd.temprature=4"])
    with pytest.raises(ParamsError, match="key 'train.epochs'"):
        load_params(quick, ["train.epochs=many"])
    with pytest.raises(ParamsError, match="Error parsing override"):
        load_params(quick, ["kd.temperature=="])
    with pytest.raises(ParamsError, match="lists several values"):
        load_params(quick, ["kd.temperature=1,2"])
    assert expand_sweeps(["kd.temperature=1,2", "train.epochs=3", "seed=0,1"]) == [
        ["kd.temperature=1", "train.epochs=3", "seed=0"], ["kd.temperature=1", "train.epochs=3", "seed=1"],
        ["kd.temperature=2", "train.epochs=3", "seed=0"], ["kd.temperature=2", "train.epochs=3", "seed=1"]]


def test_the_effective_settings_file_repeats_the_run(tmp_path):
    from audiokd_lib.core.params import write_effective

    profile = write_profile(tmp_path, f"extends: {ROOT / 'params' / 'smoke.yaml'}\noutputs: {tmp_path / 'out'}\n")
    params = load_params(profile, ["kd.alpha=0.9"], profile="smoke-kd.alpha=0.9")
    path = write_effective(params, profile, ["kd.alpha=0.9"])
    assert path == tmp_path / "out" / "params" / "smoke-kd.alpha=0.9.yaml"
    assert "with --set kd.alpha=0.9" in path.read_text().splitlines()[0]
    assert load_params(path) == params  # a complete profile: `audiokd run --params` on it runs the same


def test_cli_run_with_set_runs_the_changed_profile_and_a_sweep_side_by_side(tmp_path, monkeypatch, capsys):
    import pandas as pd

    from audiokd_lib import cli

    ran = []

    def fake_run(params_file, start=None):  # the notebooks: a results table of the profile it was given
        params = load_params(params_file)
        ran.append(params)
        params.output_dir.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"role": ["student-kd"], "variant": ["kd-cached"],
                      "heldout macro-F1": [params.kd.temperature / 10]}).to_csv(params.output_dir / "results.csv")

    monkeypatch.setattr(cli, "run_notebooks", fake_run)
    monkeypatch.setattr(cli, "_print_table", lambda params_file: None)
    profile = write_profile(tmp_path, f"extends: {ROOT / 'params' / 'smoke.yaml'}\noutputs: {tmp_path}/{{profile}}\n")
    assert cli.main(["run", "--params", str(profile), "--set", "train.epochs=2"]) == 0
    assert ran[-1].profile == "profile" and ran[-1].train.epochs == 2
    assert (tmp_path / "profile" / "params" / "profile.yaml").is_file()
    assert cli.main(["run", "--params", str(profile), "--set", "kd.temperature=1,4"]) == 0
    assert [p.profile for p in ran[-2:]] == ["profile-kd.temperature=1", "profile-kd.temperature=4"]
    out = capsys.readouterr().out
    assert "side by side" in out and "profile-kd.temperature=4" in out and "0.4" in out
    assert cli.main(["run", "--params", str(profile), "--set", "kd.temprature=4"]) == 1
    assert "unknown key 'kd.temprature'" in capsys.readouterr().err
