"""Config precedence (defaults < recipe < flags) and the shipped recipes."""
from __future__ import annotations

import pytest

from conftest import EXAMPLES, invoke_json
from s2cli import ConfigError
from s2cli.config import build_config, list_recipes, load_recipe


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_each_recipe_states_its_true_output_shape(cli, name):
    _, doc = load_recipe(name)
    plan = invoke_json(cli, "extract", EXAMPLES, "--recipe", name, "--random-init", "--dry-run", "--json", "--limit", 2)
    stated = doc["output_shape"]  # one shape, or per example photo where the strategy's grid follows the image
    assert plan["images"] and all(im["output_shape"] == (stated[im["key"]] if isinstance(stated, dict) else stated)
                                  for im in plan["images"])
    text = list_recipes()[name].read_text()
    assert "Source:" in text  # each recipe cites where its settings come from


def test_shipped_recipes():
    assert {"llava-1.5-s2", "vila-1.5-s2", "dinov2-s2", "default"} <= set(list_recipes())
    llava, _ = load_recipe("llava-1.5-s2")
    assert llava["model"] == "clip-vit-l-336" and llava["img_sizes"] == [336, 672, 1008] and llava["layer"] == -2


def test_flags_override_recipe_and_unset_flags_do_not():
    cfg = build_config("in", recipe="llava-1.5-s2", fit="pad", split_mode=None, batch_size=None)
    assert cfg.fit == "pad" and cfg.model == "clip-vit-l-336" and cfg.split_mode == "resize" and cfg.batch_size == 8
    prov = dict(cfg.provenance)
    assert prov["fit"] == "flag" and prov["model"] == "recipe" and "split_mode" not in prov


def test_scales_flag_replaces_recipe_img_sizes():
    cfg = build_config("in", recipe="llava-1.5-s2", scales=[1, 2])
    assert cfg.scales == (1.0, 2.0) and cfg.img_sizes is None


def test_recipe_from_path_and_errors(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("config:\n  model: dinov2-l\n  scales: [1, 3]\n")
    assert build_config("in", recipe=str(p)).scales == (1.0, 3.0)
    with pytest.raises(ConfigError, match="unknown recipe"):
        build_config("in", recipe="llava-9")
    p.write_text("config:\n  modle: dinov2-l\n")
    with pytest.raises(ConfigError, match="modle"):
        build_config("in", recipe=str(p))


def test_resolved_config_records_recipe_and_provenance(cli, tmp_path, image_dir):
    from s2cli import open_features

    out = tmp_path / "r.h5"
    invoke_json(cli, "extract", image_dir, "--recipe", "default", "--random-init", "--fit", "squash", "-o", out,
                "-j", 0, "--json")
    with open_features(out) as ff:
        cfg = ff.config
    assert cfg["recipe"] == "default" and cfg["fit"] == "squash"
    assert cfg["set_by"]["fit"] == "flag" and cfg["set_by"]["scales"] == "recipe" and cfg["set_by"]["random_init"] == "flag"


def test_recipes_command_lists_them(cli):
    rows = invoke_json(cli, "recipes", "--json")
    assert {r["name"] for r in rows} >= {"llava-1.5-s2", "vila-1.5-s2", "dinov2-s2", "default"}
