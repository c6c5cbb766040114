"""The configuration tree: recipes (JSON or YAML, nested or flat), flags, validation, the saved
config, the ``gsil`` command, and the module structure (no two modules import each other)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

import experiments.run
from experiments import cli
from experiments.config import (
    FLAGS,
    ConfigError,
    RunConfig,
    from_dict,
    leaves,
    load_pipeline,
    load_preset,
    load_saved_config,
)

ROOT = Path(__file__).resolve().parent.parent


def _dry_run(capsys, main, *argv) -> dict:
    main(["--dry-run", *argv])
    return json.loads(capsys.readouterr().out.split("\n", 1)[1])


@pytest.mark.parametrize(
    ("recipe", "named"),
    [
        ({"optim": {"learning_rat": 1e-5}}, "optim.learning_rat"),
        ({"learning_rat": 1e-5}, "learning_rat"),
        ({"modle": {"name_or_path": "x"}}, "modle"),
        ({"objective": {"metod": "sft"}}, "objective.metod"),
    ],
)
def test_a_misspelled_key_is_an_error_naming_it(tmp_path, recipe, named):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(recipe))
    with pytest.raises(ConfigError, match=f"{path}.*unknown key '{named}'"):
        load_preset(str(path))
    with pytest.raises(SystemExit, match=f"unknown key '{named}'"):
        experiments.run.main(["--config", str(path), "--dry-run"])


@pytest.mark.parametrize(
    ("recipe", "named", "kind"),
    [
        ({"optim": {"learning_rate": "fast"}}, "optim.learning_rate", "float"),
        ({"num_demos": 2.5}, "data.num_demos", "integer"),
        ({"data": {"skip_invalid": "yes"}}, "data.skip_invalid", "true or false"),
        ({"seed": True}, "seed", "integer"),
        ({"model": {"lora_rank": [1]}}, "model.lora_rank", "integer"),
        ({"optim": 3}, "optim", "section"),
    ],
)
def test_a_wrong_type_is_an_error_naming_the_key(tmp_path, recipe, named, kind):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=f"'{named}'.*{kind}"):
        load_preset(str(path))


def test_a_bad_stage_in_a_pipeline_recipe_is_named(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"pipeline": "p", "stages": [{"name": "a", "epoch": 2}]}))
    with pytest.raises(ConfigError, match="stage a.*unknown key 'epoch'.*did you mean 'epochs'"):
        load_pipeline(str(path))
    path.write_text(
        yaml.safe_dump({"pipeline": "p", "stages": [{"name": "a"}], "evaluate": {"limt": 3}})
    )
    with pytest.raises(ConfigError, match="unknown key 'evaluate.limt'"):
        load_pipeline(str(path))


def test_nested_and_flat_recipes_give_the_same_tree():
    flat = from_dict(
        {
            "lr": 3e-5,
            "model": "m",
            "gen_batch_size": 4,
            "method": "spin",
            "report_to": "tensorboard",
            "optim.epochs": 2,
        }
    )
    nested = from_dict(
        {
            "optim": {"learning_rate": 3e-5, "epochs": 2},
            "model": {"name_or_path": "m"},
            "generation": {"batch_size": 4},
            "objective": {"method": "spin"},
            "logging": {"report_to": ["tensorboard"]},
        }
    )
    assert flat == nested
    assert flat.optim.learning_rate == 3e-5 and flat.generation.batch_size == 4
    assert flat.logging.report_to == ["tensorboard"]
    assert from_dict(flat.to_dict()) == flat  # the saved form reads back to the same tree


@pytest.mark.parametrize("name", ["quick", "paper-zephyr"])
def test_a_preset_name_and_its_recipe_file_resolve_to_the_same_config(capsys, name):
    recipe = str(ROOT / "recipes" / f"{name}.yaml")
    assert from_dict(load_preset(recipe)) == from_dict(load_preset(name))
    # through both commands, with a flag on top
    via_name = _dry_run(capsys, experiments.run.main, "--preset", name, "--rounds", "3")
    via_file = _dry_run(
        capsys, lambda argv: cli.main(["train", *argv]), "--config", recipe, "--rounds", "3"
    )
    assert via_name == via_file and via_name["rounds"] == 3


def test_recipes_come_in_one_format():
    presets = ROOT / "experiments" / "presets"
    assert {p.suffix for p in presets.iterdir()} == {".yaml"}
    assert (ROOT / "recipes").resolve() == presets.resolve()


def test_flags_override_the_recipe_and_the_run_writes_the_resolved_tree(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"optim": {"learning_rate": 1e-4, "epochs": 3}}))
    args = experiments.run.build_parser().parse_args(["--config", str(path), "--lr", "2e-4"])
    from experiments.config import resolve_config

    config = resolve_config(args, args.preset)
    assert config.optim.learning_rate == 2e-4 and config.optim.epochs == 3


def test_a_flat_config_json_of_earlier_versions_still_reads(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "method": "sft",
                "lr": 1e-4,
                "model": "m",
                "data": "rg:chain_sum",
                "gen_batch_size": 2,
                "generator": "hf",
                "gamma": None,
            }
        )
    )
    config = load_saved_config(path)
    assert (config.objective.method, config.optim.learning_rate) == ("sft", 1e-4)
    assert (config.generation.batch_size, config.generation.backend) == (2, "hf")


def test_every_leaf_has_one_flag_and_help():
    for leaf in leaves():
        assert leaf.help, leaf.path
        assert FLAGS[leaf.flag] == leaf and FLAGS[".".join(leaf.path)] == leaf
    text = experiments.run.build_parser().format_help()
    for leaf in leaves():
        assert "--" + leaf.flag.replace("_", "-") in text
    assert RunConfig().optim.learning_rate == RunConfig().to_dict()["optim"]["learning_rate"]


def test_gsil_command_dispatches_and_explains(capsys):
    assert cli.main([]) == 2
    assert "train" in capsys.readouterr().out
    assert cli.main(["nosuch"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert capsys.readouterr().out.startswith("usage: gsil train")


def _imports(path: Path, package_root: Path) -> set[str]:
    """Project modules imported by a file (top-level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_two_modules_import_each_other():
    modules = {}
    for package in ("gsil", "experiments", "analysis", "paper_figs"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    edges = {
        (name, target)
        for name, path in modules.items()
        for target in _imports(path, ROOT)
        if target in modules and target != name
    }
    mutual = sorted(
        (a, b)
        for a, b in edges
        if (b, a) in edges and a < b and not b.startswith(a + ".") and not a.startswith(b + ".")
    )
    assert mutual == []


def test_the_plan_counts_k_responses_per_prompt():
    from experiments.planning import plan_run

    one = from_dict({"method": "dft", "num_demos": 40, "do_sample": True, "num_samples": 1})
    three = one.replace(num_samples=3)
    plan_one, plan_three = plan_run(one), plan_run(three)
    assert plan_three["generated_responses"] == 3 * plan_one["generated_responses"] == 3 * 40
    assert plan_three["tokens"]["generated"] == 3 * plan_one["tokens"]["generated"]
    assert plan_three["optimizer_steps"] == plan_one["optimizer_steps"]
    assert (
        plan_three["estimate"]["minutes_on_this_cpu"] > plan_one["estimate"]["minutes_on_this_cpu"]
    )
    assert three.run_name() == "dft-seed0" and three.replace(dft_variant="dft2").run_name() == (
        "dft2-seed0"
    )


def test_errors_of_a_section_are_configuration_errors():
    with pytest.raises(ConfigError, match="needs generation.do_sample"):
        from_dict({"num_samples": 2})
    for key, value in [("beta", 0.0), ("lr", -1.0), ("dft_tau", 0.0), ("dft_gamma", 1.5)]:
        with pytest.raises(ConfigError, match=key.replace("_", "-")):
            from_dict({key: value})
