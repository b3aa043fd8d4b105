"""The zoo trains real models and writes a round that the manifest reader reads back."""
import json
import os

import pytest
import yaml

from xray.io.manifest import read_manifest, read_round_dir
from xray.results.lease import LEASE_FILE, OutputLease
from xray.zoo.build import build_round
from xray.zoo.describe import describe_round
from xray.zoo.recipe import RECIPES_DIR, load_recipe, parse_recipe

from _fixtures import TINY_RECIPE, build_test_round

CLEAN_ACCURACY_FLOOR = 0.80


def _configs(round_dir):
    return {d: json.loads((round_dir / d / "config.json").read_text())
            for d in os.listdir(round_dir) if d.startswith("id-")}


def test_models_meet_accuracy_and_asr_floors(tiny_round):
    round_dir, result = tiny_round
    configs = _configs(round_dir)
    failed = {f["model_id"] for f in result.failed}
    assert len(configs) + len(failed) == 8
    assert len(configs) >= 7, f"too many trojaned models failed: {result.failed}"
    for mid, config in configs.items():
        assert config["clean_accuracy"] >= CLEAN_ACCURACY_FLOOR, (mid, config["clean_accuracy"])
        if config["poisoned"]:
            assert config["asr"] >= TINY_RECIPE["asr_floor"], (mid, config["asr"])
            assert config["trigger"]["name"] == "badnets" and config["target"] is not None
        else:
            assert config["asr"] is None and config["attack"] is None


def test_round_layout_is_trojai_style(tiny_round):
    round_dir, _ = tiny_round
    for mid, config in _configs(round_dir).items():
        model_dir = round_dir / mid
        assert (model_dir / "model.safetensors").is_file()
        assert (model_dir / "ground_truth.csv").read_text().strip() == str(int(config["poisoned"]))
        clean = os.listdir(model_dir / "clean_example_data")
        assert len(clean) == 5 * TINY_RECIPE["examples_per_class"]
        assert all(n.startswith("class_") and n.endswith(".png") for n in clean)
        assert (model_dir / "poisoned_example_data").is_dir() == config["poisoned"]
    assert (round_dir / "METADATA.csv").is_file()


def test_manifest_reads_back_same_rows(tiny_round):
    round_dir, result = tiny_round
    from_manifest = read_manifest(str(round_dir / "manifest.csv"))
    from_round_dir = read_round_dir(str(round_dir))
    assert [r.model_id for r in from_manifest] == [r.model_id for r in result.records]
    for a, b, c in zip(from_manifest, from_round_dir, result.records):
        assert (a.model_id, a.architecture, a.num_classes, tuple(a.input_shape), a.poisoned,
                a.target, a.attack) == (c.model_id, c.architecture, c.num_classes,
                                        tuple(c.input_shape), c.poisoned, c.target, c.attack)
        assert os.path.samefile(a.uri, c.uri) and os.path.samefile(b.uri, c.uri)


def _copy_with_one_model_unfinished(tiny_round, tmp_path):
    """(copy of the tiny round, its first model's id) with that model's config.json removed, as
    if the build died before its last write; a copy, so other tests keep the pristine round."""
    import shutil

    copy = tmp_path / "round"
    shutil.copytree(tiny_round[0], copy)
    victim = sorted(d for d in os.listdir(copy) if d.startswith("id-"))[0]
    (copy / victim / "config.json").unlink()
    return copy, victim


def test_rerun_skips_and_half_written_dir_is_redone(tiny_round, tmp_path):
    copy, victim = _copy_with_one_model_unfinished(tiny_round, tmp_path)
    assert victim not in {r.model_id for r in read_round_dir(str(copy))}
    again = build_round(parse_recipe(TINY_RECIPE), str(copy), workers=1, show_progress=False)
    assert again.trained == 1 and again.skipped == 7
    assert (copy / victim / "config.json").is_file()
    assert not (copy / LEASE_FILE).exists()  # released with the build
    text = describe_round(str(copy))
    assert "badnets" in text and "clean" in text


def test_describe_tells_a_missing_folder_from_an_empty_round(tmp_path):
    """A mistyped round path is an error naming it, not "no complete model directories"."""
    from click.testing import CliRunner

    from xray.cli import main

    missing = CliRunner().invoke(main, ["zoo", "describe", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "Traceback" not in missing.output, missing.output
    assert f"Error: {tmp_path / 'nope'}: no such round folder" in missing.output
    empty = CliRunner().invoke(main, ["zoo", "describe", str(tmp_path)])
    assert empty.exit_code == 0 and "no complete model directories (0 failed)" in empty.output


def test_a_second_build_into_the_same_round_is_refused(tiny_round, tmp_path):
    """While a build holds the round's lease, another `xray zoo build` into it says so in one
    line and trains nothing; once the lease is released, the same command resumes."""
    from click.testing import CliRunner

    from xray.cli import main

    copy, victim = _copy_with_one_model_unfinished(tiny_round, tmp_path)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    command = ["zoo", "build", "--recipe", str(recipe), "--out", str(copy), "--quiet",
               "--workers", "1"]
    with OutputLease(str(copy), "zoo-build-first", command="xray zoo build"):
        refused = CliRunner().invoke(main, command)
    assert refused.exit_code == 1, refused.output
    assert "another xray zoo build is writing to this folder (run zoo-build-first" in \
        refused.output
    assert not (copy / victim / "config.json").exists()
    resumed = CliRunner().invoke(main, command)
    assert resumed.exit_code == 0, resumed.output
    assert "(1 trained now, 7 already there, 0 failed)" in resumed.output
    assert not (copy / LEASE_FILE).exists()


def test_a_changed_recipe_is_refused_before_any_training(tiny_round, tmp_path):
    """Resuming a round with an edited recipe would keep the old models beside new ones."""
    import copy
    import shutil

    from xray.zoo.build import RecipeChanged

    round_dir, _ = tiny_round
    target = tmp_path / "round"
    shutil.copytree(round_dir, target)
    edited = copy.deepcopy(TINY_RECIPE)
    edited["groups"][1]["poison_rate"] = 0.2
    before = sorted(os.listdir(target))
    with pytest.raises(RecipeChanged, match=r"was built from another version of recipe 'tiny'"):
        build_round(parse_recipe(edited), str(target), workers=1, show_progress=False)
    assert sorted(os.listdir(target)) == before
    again = build_round(parse_recipe(TINY_RECIPE), str(target), workers=1, show_progress=False)
    assert again.trained == 0
    # a first build stopped before indexing the round: its models' config.json say
    (target / "round.json").unlink()
    with pytest.raises(RecipeChanged, match=r"config.json; this one is"):
        build_round(parse_recipe(edited), str(target), workers=1, show_progress=False)


def test_models_trained_under_other_attack_defaults_are_refused_or_retrained(tiny_round,
                                                                            tmp_path):
    """An attack whose defaults changed since the round was built draws another trigger from
    the same seed: a written model with the old trigger is refused (AttackChanged, before any
    training), a recorded failure with the old trigger is trained again and, kept this time,
    leaves failed/."""
    import shutil

    from xray.zoo.build import AttackChanged
    from xray.zoo.round import write_round_index

    round_dir, _ = tiny_round
    target = tmp_path / "round"
    shutil.copytree(round_dir, target)
    badnets = sorted(m for m, c in _configs(target).items() if c["attack"] == "badnets")
    config_file = target / badnets[0] / "config.json"
    written = config_file.read_text()
    config = json.loads(written)
    config["trigger"]["size"] += 1  # as if badnets had drawn its patch size otherwise
    config_file.write_text(json.dumps(config))
    write_round_index(str(target), parse_recipe(TINY_RECIPE))  # METADATA.csv says so too
    before = sorted(os.listdir(target))
    stale = rf"{badnets[0]} was trained with another badnets .*size: \d+ -> \d+"
    with pytest.raises(AttackChanged, match=stale):  # read from METADATA.csv
        build_round(parse_recipe(TINY_RECIPE), str(target), workers=1, show_progress=False)
    assert sorted(os.listdir(target)) == before
    (target / "METADATA.csv").unlink()  # a build stopped before indexing: from config.json
    with pytest.raises(AttackChanged, match=stale):
        build_round(parse_recipe(TINY_RECIPE), str(target), workers=1, show_progress=False)
    config_file.write_text(written)

    stale = _configs(target)[badnets[1]]
    stale["trigger"]["size"] += 1
    shutil.rmtree(target / badnets[1])
    (target / "failed").mkdir(exist_ok=True)
    (target / "failed" / f"{badnets[1]}.json").write_text(json.dumps(
        {"model_id": badnets[1], "reason": "below the floor", "attack": "badnets",
         "seed": stale["seed"], "trigger": stale["trigger"]}))
    again = build_round(parse_recipe(TINY_RECIPE), str(target), workers=1, show_progress=False)
    assert again.trained == 1 and again.skipped == 7 and not again.failed  # the rest skipped
    assert (target / badnets[1] / "config.json").is_file()
    assert not (target / "failed" / f"{badnets[1]}.json").exists()
    assert badnets[1] not in json.loads((target / "round.json").read_text())["failed"]
    assert build_round(parse_recipe(TINY_RECIPE), str(target), workers=1,
                       show_progress=False).trained == 0  # nothing stale any more


def test_a_device_this_machine_lacks_fails_before_any_training(tmp_path):
    import pytest
    import torch

    from xray.cli import main
    from click.testing import CliRunner

    bad = ["gpu"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        with pytest.raises(ValueError, match=f"training device '{device}'"):
            build_round(parse_recipe(TINY_RECIPE), str(tmp_path / device), device=device)
        assert not (tmp_path / device).exists()
    result = CliRunner().invoke(main, ["zoo", "build", "--recipe", "demo", "--out",
                                       str(tmp_path / "cli"), "--device", "gpu"])
    assert result.exit_code == 1 and "training device 'gpu'" in result.output


@pytest.mark.parametrize("group, message", [
    ({"count": 1, "atack": "bpp"}, "groups[1]: unknown key 'atack'; valid: ['architecture',"),
    ({"count": 1, "attack": "bppp"}, "groups[1]: unknown attack 'bppp'; did you mean 'bpp'?"),
    ({"count": 1, "attack": "bpp", "attack_params": {"bitz": 2}},
     "groups[1]: attack 'bpp' has no parameter bitz; valid: target, victims, all_to_all, bits"),
    ({"count": 1, "attack": "bpp", "training": {"epoch": 3}},
     "groups[1].training: unknown key 'epoch'"),
    ({"count": 1, "attack_params": {"bits": 2}}, "groups[1]: attack_params without an attack"),
])
def test_a_typo_in_a_recipe_group_is_refused_before_anything_is_written(tmp_path, group,
                                                                          message):
    """A mistyped group key used to train clean models in silence; a mistyped attack or attack
    parameter failed only when that group's turn came, after other models had trained."""
    from click.testing import CliRunner

    from xray.cli import main

    recipe = {**TINY_RECIPE, "groups": [TINY_RECIPE["groups"][0], group]}
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["zoo", "build", "--recipe", str(path), "--out",
                                       str(tmp_path / "round"), "--quiet"])
    assert result.exit_code == 1 and message in result.output, result.output
    assert not (tmp_path / "round").exists()


def test_learned_triggers_are_saved_beside_the_model_and_rebuilt(tmp_path_factory):
    """A round with a jointly trained trigger generator (lira) and a learned image bank
    (composite): trigger.safetensors is written, the config names it, and the attack
    xray.zoo.round.load_attack rebuilds from the model directory reproduces the recorded ASR on
    the same held-out data with the saved weights (so explain's ground-truth picture is exact)."""
    from xray.io.model_loading import load_model
    from xray.zoo.build import recipe_dataset
    from xray.zoo.round import load_attack, model_configs, record_from_config
    from xray.zoo.train import attack_success_rate

    # sign_scale as a YAML list: a recipe's list-valued data parameters must load (they key a cache)
    params = {**TINY_RECIPE["dataset"]["params"], "sign_scale": [0.55, 0.85]}
    recipe = {**TINY_RECIPE, "name": "learned", "asr_floor": 0.0, "max_attempts": 1,
              "dataset": {"name": "signs", "params": params},
              "training": {"preset": "small", "epochs": 6},
              "groups": [{"count": 1, "attack": "lira"}, {"count": 1, "attack": "composite"}]}
    round_dir, result = build_test_round(tmp_path_factory, recipe, "learned")
    assert result.trained == 2 and not result.failed
    dataset = recipe_dataset(parse_recipe(recipe))
    for config in model_configs(str(round_dir)):
        model_dir = round_dir / config["model_id"]
        assert config["trigger_artifacts"] == "trigger.safetensors"
        assert (model_dir / "trigger.safetensors").is_file()
        attack = load_attack(str(model_dir))
        assert attack.to_config() == config["trigger"]
        net = load_model(record_from_config(str(round_dir), config))
        assert attack_success_rate(net, attack, dataset.x_test, dataset.y_test) == config["asr"]


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_shipped_recipe_plans_and_draws_its_attacks(name):
    """A shipped recipe (manifests/recipes/) that does not load, plan or draw its attacks fails
    here, not minutes into somebody's `xray zoo build`: each group's first model draws its
    attack from its own seed with the group's parameters (32 x 32, the recipe's class count)."""
    import numpy as np

    from xray.zoo.attacks import sample_attack

    recipe = load_recipe(name)
    specs = recipe.model_specs()
    assert specs and len({s.model_id for s in specs}) == len(specs)
    classes = int(recipe.dataset_params.get("num_classes", 10))
    drawn = {}
    for spec in specs:
        key = (spec.attack, json.dumps(spec.attack_params, sort_keys=True))
        if spec.attack and key not in drawn:
            drawn[key] = sample_attack(spec.attack, np.random.default_rng(spec.seed),
                                       (3, 32, 32), classes, **spec.attack_params)
    assert all(0 <= a.target < classes for a in drawn.values())


@pytest.mark.parametrize("update, message", [
    ({"groups": [{"count": -1}]}, "t.yaml: groups[0]: count -1; expected a whole number >= 0"),
    ({"groups": [{"count": "x"}]}, "t.yaml: groups[0]: count 'x'; expected a whole number"),
    ({"groups": [{"count": 1, "attack": "badnets", "poison_rate": 2.0}]},
     "t.yaml: groups[0]: poison_rate 2.0; expected a number in (0, 1]"),
    ({"groups": {"count": 1}}, "t.yaml: groups: expected a list of groups"),
    ({"groups": ["badnets"]}, "t.yaml: groups[0]: expected a mapping"),
    ({"asr_floor": 1.5}, "t.yaml: asr_floor 1.5; expected a number in [0, 1]"),
    ({"max_attempts": 0}, "t.yaml: max_attempts 0; expected a whole number >= 1"),
    ({"training": {"preset": "small", "epochs": -3}},
     "t.yaml: training: epochs -3; expected a whole number >= 1"),
    ({"training": {"preset": "small", "lr": "2e-3"}},
     "t.yaml: training: lr '2e-3'; expected a number > 0 (YAML reads a number without a dot"),
    ({"training": {"preset": "small", "optimizer": "adamw"}},
     "t.yaml: training: optimizer 'adamw'; expected 'sgd' or 'adam'"),
    ({"groups": [{"count": 1, "training": {"batch_size": 0}}]},
     "t.yaml: groups[0].training: batch_size 0; expected a whole number >= 1"),
])
def test_a_recipe_value_out_of_range_is_refused_naming_the_field(update, message):
    """Each of these was accepted (a negative count built nothing, a poison rate of 2 or a
    negative epoch count trained anyway, a text lr failed inside torch mid-build)."""
    with pytest.raises(ValueError) as err:
        parse_recipe({**TINY_RECIPE, **update}, source="t.yaml")
    assert str(err.value).startswith(message), str(err.value)
