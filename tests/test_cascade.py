"""Cascade scanning (issue 22): stages in the scan config, the uncertain models going on, the
decisions written as rows of detector "cascade", resume, and the report's stage view."""
from __future__ import annotations

import json
import math
import shutil

import pytest
from click.testing import CliRunner

from xray.config import Stage, parse_config
from xray.pipeline import uncertain_models

FAST_MODELXRAY = {"params": {"num_planes": 2, "resolution": 16}}  # as tiny_scores scans it


@pytest.mark.parametrize("stages, message", [
    ([{"detectors": ["mmbd"]}], "modelxray in no stage"),
    ([{"detectors": ["modelxray", "mmbd"], "uncertain": [0.2, 0.8]}], "last stage"),
    ([{"detectors": ["modelxray"]}, {"detectors": ["mmbd"]}], "give one of"),
    ([{"detectors": ["modelxray"], "uncertain": [0.2, 0.8], "uncertain_share": 0.1},
      {"detectors": ["mmbd"]}], "give one of"),
    ([{"detectors": ["modelxray"], "uncertain": [0.9, 0.2]}, {"detectors": ["mmbd"]}],
     "lo <= hi"),
    ([{"detectors": ["modelxray", "nc"], "uncertain": [0.2, 0.8]}, {"detectors": ["mmbd"]}],
     "not one of the config's detectors"),
    ([{"detectors": ["modelxray"], "uncertain_share": 0.5},
      {"detectors": ["mmbd", "modelxray"]}], "already in an earlier stage"),
    ([{"detectors": ["modelxray"], "band": [0.1, 0.9]}, {"detectors": ["mmbd"]}],
     "unknown key 'band'"),
])
def test_bad_stages_are_refused_naming_the_stage(stages, message):
    raw = {"detectors": {"modelxray": {}, "mmbd": {}}, "stages": stages}
    with pytest.raises(ValueError, match=message) as err:
        parse_config(raw, source="cascade.yaml")
    assert str(err.value).startswith("cascade.yaml: stages")


def test_stages_parse_and_leave_detector_hashes_alone():
    raw = {"detectors": {"modelxray": {}, "mmbd": {}},
           "stages": [{"detectors": "modelxray", "calibrator": "cal.json",
                       "uncertain": [0.2, 0.8]}, {"detectors": ["mmbd"]}]}
    config = parse_config(raw)
    assert config.stages == (Stage(("modelxray",), "cal.json", (0.2, 0.8)), Stage(("mmbd",)))
    flat = parse_config({"detectors": {"modelxray": {}, "mmbd": {}}})
    assert config.config_hash == flat.config_hash  # stages pick models, never change scores
    assert json.loads(config.to_json())["stages"][0]["uncertain"] == [0.2, 0.8]
    assert [d.name for d in config.only(["mmbd"]).detectors] == ["mmbd"]


def test_uncertain_models_by_band_and_by_share():
    p = {"a": 0.05, "b": 0.45, "c": 0.7, "d": 0.95, "e": math.nan}
    assert uncertain_models(p, Stage(("x",), uncertain=(0.2, 0.8))) == ["b", "c", "e"]
    # the 40% nearest 0.5 (2 of 5): the model with no probability first, then b
    assert uncertain_models(p, Stage(("x",), uncertain_share=0.4)) == ["b", "e"]
    assert uncertain_models(p, Stage(("x",), uncertain_share=0.0)) == ["e"]
    assert uncertain_models(p, Stage(("x",), uncertain=(0.0, 1.0))) == sorted(p)


def test_a_stage_cannot_use_scores_it_has_not_computed(tiny_scores, tmp_path):
    from xray.pipeline import stage_calibrators
    from xray.reduce.calibrate import fit
    from xray.results.sink import read_table

    out = tiny_scores[0]
    cal = fit(read_table(str(out), "scores"), detectors=["modelxray"])
    cal_uri = cal.save(str(tmp_path / "cal.json"))
    config = parse_config({"detectors": {"mmbd": {}, "modelxray": FAST_MODELXRAY},
                           "stages": [{"detectors": ["mmbd"], "calibrator": cal_uri,
                                       "uncertain": [0.2, 0.8]},
                                      {"detectors": ["modelxray"]}]})
    with pytest.raises(ValueError, match=r"stages\[0\].calibrator .*modelxray, which stage 1"):
        stage_calibrators(config)


def test_cascade_runs_stage_two_only_where_stage_one_is_unsure(tiny_round, tiny_scores,
                                                               ray_local, tmp_path):
    """Stage 1 = Model X-ray (its rows reused from an earlier scan), stage 2 = MM-BD, really
    scanned, on the 25% of models whose stage-1 probability is nearest 0.5. Re-running scans
    nothing; the report shows the stages."""
    import yaml

    from xray.cli import main
    from xray.reduce.calibrate import fit
    from xray.results.sink import read_table

    round_dir, _ = tiny_round
    out = tmp_path / "out"
    shutil.copytree(tiny_scores[0], out)
    before = read_table(str(out), "scores")
    cal_uri = fit(before, detectors=["modelxray"]).save(str(tmp_path / "stage1.json"))
    config = {"seed": 0,
              "detectors": {"modelxray": FAST_MODELXRAY, "mmbd": {"preset": "small"}},
              "stages": [{"detectors": ["modelxray"], "calibrator": cal_uri,
                          "uncertain_share": 0.25},
                         {"detectors": ["mmbd"]}]}
    (tmp_path / "cascade.yaml").write_text(yaml.safe_dump(config))
    args = ["scan", "--manifest", str(round_dir), "--out", str(out), "--config",
            str(tmp_path / "cascade.yaml"), "--actors", "1", "--quiet"]

    n = before["model_id"].nunique()  # the round's models (a build may drop one)
    going_on = math.ceil(0.25 * n)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "stage 1 (modelxray): " in result.output
    assert f"0 of {n} models scanned ({n} already scored)" in result.output  # stage 1 reused
    assert f"{going_on} went on" in result.output
    assert "stage 2 (mmbd): " in result.output
    assert f"{going_on} of {going_on} models scanned" in result.output
    assert (f"cascade: {n} models decided ({n - going_on} at stage 1, {going_on} at stage 2)"
            in result.output)

    scores = read_table(str(out), "scores")
    cascade = scores[scores["detector"] == "cascade"].set_index("model_id")
    assert len(cascade) == n and set(cascade["status"]) == {"ok"}
    stats = {m: json.loads(s) for m, s in cascade["stats_json"].items()}
    went_on = sorted(m for m, st in stats.items() if st["stage"] == 2)
    p1 = {m: st["stage_probabilities"][0] for m, st in stats.items()}
    nearest = sorted(p1, key=lambda m: (abs(p1[m] - 0.5), m))[:going_on]
    assert went_on == sorted(nearest)
    # MM-BD ran on exactly those models, and really worked on them
    mmbd = scores[scores["detector"] == "mmbd"]
    assert sorted(mmbd["model_id"]) == went_on
    assert all(json.loads(s)["steps"] > 0 for s in mmbd["stats_json"])
    for m, st in stats.items():
        assert cascade.loc[m, "score"] == pytest.approx(st["probability"])
        assert st["stage_detectors"][:st["stage"]] == [["modelxray"], ["mmbd"]][:st["stage"]]
        if st["stage"] == 1:  # decided by the stage-1 calibrator
            assert st["probability"] == pytest.approx(p1[m])
            assert len(st["stage_seconds"]) == 1
        else:  # mmbd's seconds are in the model's cost
            assert len(st["stage_seconds"]) == 2 and st["stage_seconds"][1] > 0
            assert set(st["inputs"]) == {"modelxray", "mmbd"}

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert f"{going_on} went on" in again.output
    assert f"0 of {going_on} models scanned ({going_on} already scored)" in again.output
    latest = read_table(str(out), "scores")
    assert len(latest[latest["detector"] == "mmbd"]) == going_on
    decided = latest[latest["detector"] == "cascade"].set_index("model_id")
    assert (decided["score"].sort_index() == cascade["score"].sort_index()).all()

    report = CliRunner().invoke(main, ["report", str(out), "--planes", "0", "--quiet",
                                       "--max-drilldown", "0"])
    assert report.exit_code == 0, report.output
    assert "cascade" in report.output  # the summary has the cascade beside the detectors
    html = (out / "report.html").read_text()
    assert 'id="cascade-table"' in html and "cascade stage" in html
    assert (f'<td>2</td><td class="text">mmbd</td><td>{going_on}</td><td>{going_on}</td>'
            in html)
