"""Config precedence (defaults < recipe < flags) and the shipped recipes. The rules are tested on build_config and
resolve_config directly (no weights, no images); a few tests check the same through whole extractions."""
from __future__ import annotations

import json

import pytest

from conftest import EXAMPLES, invoke_json
from s2cli import ConfigError
from s2cli.backbones import resolve
from s2cli.config import ExtractConfig, build_config, list_recipes, load_recipe, resolve_config


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


# ---- the rules at function level: build_config (defaults < recipe < flags) and resolve_config ---------------------
def _resolve(cfg):
    """As the CLI does: the backbone described from the config (no weights), then the config resolved against it."""
    return resolve_config(cfg, resolve(cfg.model, layer=cfg.layer, keep_cls=cfg.keep_cls))


def _recipe(tmp_path, text: str) -> str:
    p = tmp_path / "r.yaml"
    p.write_text("config:\n" + "".join(f"  {line}\n" for line in text.strip().splitlines()))
    return str(p)


def test_defaults_alone_set_nothing_and_record_no_provenance():
    cfg = build_config("in")
    assert cfg == ExtractConfig(input="in")
    assert cfg.provenance == () and cfg.recipe is None
    res = _resolve(cfg)
    assert res.to_dict()["set_by"] == {} and res.to_dict()["recipe"] is None
    assert res.fit == res.backbone.fit and res.img_sizes == (224, 448)  # unset: from the backbone, scales 1,2


def test_every_recipe_value_is_recorded_as_set_by_the_recipe():
    values, _ = load_recipe("vila-1.5-s2")
    cfg = build_config("in", recipe="vila-1.5-s2")
    assert dict(cfg.provenance) == {k: "recipe" for k in values} and cfg.recipe == "vila-1.5-s2"
    assert (cfg.model, cfg.img_sizes, cfg.max_split_size, cfg.layer, cfg.fit) == \
           ("siglip-so400m-384", (384, 768), 384, -2, "squash")
    res = _resolve(cfg)
    assert res.to_dict()["set_by"] == dict(cfg.provenance) and res.to_dict()["recipe"] == "vila-1.5-s2"
    assert (res.img_sizes, res.max_split_size, res.fit) == ((384, 768), 384, "squash")


def test_flags_without_a_recipe_are_recorded_as_flags_and_none_is_not_set():
    cfg = build_config("in", model="timm:test_resnet", random_init=True, batch_size=3, fit=None, layer=None, scales=None)
    assert dict(cfg.provenance) == {"model": "flag", "random_init": "flag", "batch_size": "flag"}
    assert (cfg.fit, cfg.layer, cfg.scales) == (None, None, None)


def test_a_flag_overrides_the_recipe_and_a_flag_of_none_keeps_the_recipe_value():
    kept = build_config("in", recipe="llava-1.5-s2", model=None, layer=None, max_split_size=None, fit=None,
                        img_sizes=None, scales=None)
    assert kept == build_config("in", recipe="llava-1.5-s2")  # None is "not set": the same config, same provenance
    assert (kept.layer, kept.max_split_size, kept.fit) == (-2, 336, "crop")
    cfg = build_config("in", recipe="llava-1.5-s2", layer=-1, max_split_size=168, fit=None)
    assert (cfg.layer, cfg.max_split_size, cfg.fit, cfg.model) == (-1, 168, "crop", "clip-vit-l-336")
    prov = dict(cfg.provenance)
    assert (prov["layer"], prov["max_split_size"], prov["fit"], prov["model"]) == ("flag", "flag", "recipe", "recipe")
    res = _resolve(cfg)
    assert res.backbone.layer == -1 and res.max_split_size == 168 and res.img_sizes == (336, 672, 1008)
    assert res.to_dict()["set_by"] == prov


def test_falsy_flags_that_are_not_none_still_override_the_recipe(tmp_path):
    recipe = _recipe(tmp_path, "model: timm:test_resnet\nseed: 5\nantialias: true\nresize_output_to_idx: 1\n"
                               "random_init: true")
    cfg = build_config("in", recipe=recipe, seed=0, antialias=False, resize_output_to_idx=0)
    assert (cfg.seed, cfg.antialias, cfg.resize_output_to_idx, cfg.random_init) == (0, False, 0, True)
    prov = dict(cfg.provenance)
    assert (prov["seed"], prov["antialias"], prov["resize_output_to_idx"]) == ("flag", "flag", "flag")
    assert prov["random_init"] == "recipe"


def test_a_flag_equal_to_the_recipe_value_is_recorded_as_a_flag():
    cfg = build_config("in", recipe="llava-1.5-s2", layer=-2)
    assert cfg.layer == -2 and dict(cfg.provenance)["layer"] == "flag"


def test_scales_flag_replaces_recipe_img_sizes_at_resolution():
    cfg = build_config("in", recipe="llava-1.5-s2", scales=[1, 2])
    prov = dict(cfg.provenance)
    assert cfg.scales == (1.0, 2.0) and cfg.img_sizes is None
    assert prov["scales"] == "flag" and "img_sizes" not in prov and prov["max_split_size"] == "recipe"
    res = _resolve(cfg)  # clip-vit-l-336: scales x 336, tiles of the recipe's 336
    assert res.img_sizes == (336, 672) and res.scales == (1.0, 2.0) and res.max_split_size == 336
    assert res.to_dict()["set_by"] == prov


def test_img_sizes_flag_replaces_recipe_scales_at_resolution():
    cfg = build_config("in", recipe="dinov2-s2", img_sizes=[224, 672])
    prov = dict(cfg.provenance)
    assert cfg.img_sizes == (224, 672) and cfg.scales is None
    assert prov["img_sizes"] == "flag" and "scales" not in prov and prov["model"] == "recipe"
    res = _resolve(cfg)  # dinov2-l: input 224
    assert res.img_sizes == (224, 672) and res.scales == (1.0, 3.0)
    assert res.to_dict()["set_by"] == prov


def test_scales_and_img_sizes_from_the_same_place_are_both_kept_and_refused(tmp_path):
    both_flags = build_config("in", model="timm:test_resnet", scales=[1, 2], img_sizes=[160, 320])
    assert (both_flags.scales, both_flags.img_sizes) == ((1.0, 2.0), (160, 320))
    assert dict(both_flags.provenance) == {"model": "flag", "scales": "flag", "img_sizes": "flag"}
    both_recipe = build_config("in", recipe=_recipe(tmp_path, "model: timm:test_resnet\nscales: [1, 2]\n"
                                                              "img_sizes: [160, 320]"))
    assert (both_recipe.scales, both_recipe.img_sizes) == ((1.0, 2.0), (160, 320))
    for cfg in (both_flags, both_recipe):
        with pytest.raises(ConfigError, match="--scales and --img-sizes were both given"):
            _resolve(cfg)


def test_list_values_are_cast_to_tuples_from_recipes_and_flags(tmp_path):
    recipe = _recipe(tmp_path, "model: clip-vit-l-336\nstrategy: anyres\ngrid_pinpoints: [336x672, 672x336]\n"
                               "img_sizes: ['336', 672]")
    cfg = build_config("in", recipe=recipe)
    assert cfg.img_sizes == (336, 672) and cfg.grid_pinpoints == ((336, 672), (672, 336))
    assert build_config("in", scales=[1, "1.5"]).scales == (1.0, 1.5)


def test_provenance_is_sorted_and_an_unknown_option_is_a_programming_error():
    cfg = build_config("in", recipe="llava-1.5-s2", workers=1, batch_size=2)
    assert list(cfg.provenance) == sorted(cfg.provenance)
    with pytest.raises(TypeError, match="modle"):
        build_config("in", modle="x")


def test_recipe_or_flags_resolve_alike_and_resume_alike_but_record_their_origin():
    """The same settings from a recipe or from flags: equal resolved settings (a resumed run compares these), and
    only set_by and recipe differ."""
    values, _ = load_recipe("llava-1.5-s2")
    by_recipe, by_flags = _resolve(build_config("in", recipe="llava-1.5-s2")), _resolve(build_config("in", **values))
    a, b = by_recipe.to_dict(), by_flags.to_dict()
    assert by_recipe.compare_keys() == by_flags.compare_keys()
    assert {k: a[k] for k in by_recipe.compare_keys()} == {k: b[k] for k in by_flags.compare_keys()}
    assert a["set_by"] == {k: "recipe" for k in values} and b["set_by"] == {k: "flag" for k in values}
    assert (a["recipe"], b["recipe"]) == ("llava-1.5-s2", None)


# ---- options that declare themselves (config.py `opt`) --------------------------------------------------------
# What a resumed run does with every option. A new option must be classified here: an option that changes what is
# stored is COMPARED (a resume giving another value is refused); RUN_ONLY only if it changes how fast a run goes or
# when it stops, never a stored byte.
RESUME_OF = {
    "input": "as asked", "output": "as asked", "recipe": "as asked", "scales": "as asked",
    "model": "compared", "weights": "compared", "random_init": "compared", "seed": "compared", "layer": "compared",
    "layers": "compared",
    "img_sizes": "compared", "max_split_size": "compared", "split_mode": "compared", "resize_output_to_idx": "compared",
    "fit": "compared", "antialias": "compared", "precision": "compared", "dtype": "compared", "limit": "compared",
    "input_format": "compared", "image_key": "compared", "meta_columns": "compared", "keep_ext": "compared",
    "image_column": "compared", "key_column": "compared",
    "fps": "compared", "num_frames": "compared", "max_frames": "compared", "frames_as_images": "compared",
    "format": "compared", "shard_size": "compared", "pool": "compared", "pool_only": "compared",
    "check_finite": "compared", "reduce": "compared", "decode": "compared",
    "keep_cls": "in backbone",
    "strategy": "in strategy", "min_tiles": "in strategy", "max_tiles": "in strategy", "thumbnail": "in strategy",
    "grid_pinpoints": "in strategy", "anyres_max": "in strategy", "min_pixels": "in strategy",
    "max_pixels": "in strategy",
    "batch_size": "run-only", "workers": "run-only", "prefetch_factor": "run-only", "max_tiles_per_call": "run-only", "device": "run-only",
    "on_error": "run-only", "max_failures": "run-only", "decode_timeout": "run-only", "retries": "run-only",
    "retry_failed": "run-only", "num_samples": "run-only", "compile": "run-only", "channels_last": "run-only",
}


def test_every_option_is_classified_for_resume_and_the_saved_config_follows_it():
    from dataclasses import fields

    from s2cli.config import OPTION_DECLS, resolve_options

    assert {n: d.resume for n, d in OPTION_DECLS.items()} == RESUME_OF
    assert {f.name for f in fields(ExtractConfig)} - set(OPTION_DECLS) == {"provenance"}  # the only field not an option
    res = resolve_options("in", "out/", random_init=True, strategy="internvl", model="timm:test_resnet",
                          decode="pil", retries=1, keep_cls=False, meta_columns="none", num_frames=4)
    saved, compared = res.to_dict(), set(res.compare_keys())
    for name, how in RESUME_OF.items():
        if how in ("in strategy", "in backbone"):
            assert name not in saved or name == "strategy"  # inside `strategy` / `backbone`, which are compared
        elif how == "compared" and name in saved:
            assert name in compared
        elif how != "compared":
            assert name not in compared
    assert {"strategy", "backbone"} <= compared and "set_by" not in compared
    assert saved["strategy"]["max_tiles"] == 12 and saved["backbone"]["num_prefix_tokens"] == 0


def test_a_resume_that_changes_what_is_stored_is_refused_and_a_run_only_change_is_not(tmp_path, image_dir):
    import s2cli

    tiny = dict(model="timm:test_resnet", random_init=True, img_sizes=(64, 128), max_split_size=64, workers=0)
    out = str(tmp_path / "o") + "/"
    s2cli.extract(str(image_dir), out, **tiny, limit=2)
    with pytest.raises(ConfigError, match="check_finite: True -> False"):
        s2cli.extract(str(image_dir), out, **tiny, limit=2, check_finite=False)
    s2cli.extract(str(image_dir), out, **tiny, limit=2, batch_size=3, retries=2)  # run-only: resumes (nothing left)


def test_requested_scales_are_saved_as_given_beside_the_sizes_they_make(tmp_path, image_dir):
    import s2cli
    from s2cli.config import resolve_options

    res = resolve_options("in", "o.h5", model="timm:test_resnet", random_init=True, scales=(0.7, 1.33))
    assert res.to_dict()["scales"] == [0.7, 1.33] and res.img_sizes == (112, 212)  # int(160 * s): 212 / 160 = 1.325
    out = tmp_path / "o.h5"
    s2cli.extract(str(image_dir), str(out), model="timm:test_resnet", random_init=True, scales=(0.33, 0.77),
                  max_split_size=52, workers=0, limit=1)
    with s2cli.open_features(out) as ff:
        assert ff.config["scales"] == [0.33, 0.77] and ff.config["img_sizes"] == [52, 123]
        assert json.loads(ff.attrs["scales"]) == [0.33, 0.77]  # what `s2 inspect` shows
    by_sizes = resolve_options("in", "o.h5", model="timm:test_resnet", random_init=True, img_sizes=(80, 240))
    assert by_sizes.scales == (0.5, 1.5)


def test_messages_help_and_defaults_name_options_by_their_declaration():
    from s2cli.config import OPTION_DECLS, resolve_options
    from s2cli.strategies import StrategyCfg

    for name, decl in OPTION_DECLS.items():
        if decl.allowed:  # every choice is checked against its declared values, named by its declared flag
            with pytest.raises(ConfigError) as e:
                resolve_options("in", "o.h5", random_init=True, **{name: "no-such-value"})
            assert decl.flag in str(e.value) and " | ".join(decl.allowed) in e.value.one_line()
    with pytest.raises(ConfigError, match="--batch-size must be a positive integer"):
        resolve_options("in", "o.h5", batch_size=0)
    with pytest.raises(ConfigError, match="--max-tiles does not apply to --strategy anyres"):
        resolve_options("in", "o.h5", strategy="anyres", max_tiles=4)
    with pytest.raises(ConfigError, match="--min-tiles is above --max-tiles"):
        resolve_options("in", "o.h5", strategy="internvl", min_tiles=5, max_tiles=3)
    assert OPTION_DECLS["max_tiles"].shown == str(StrategyCfg.max_tiles) == "12"  # the strategy's default, once
    res = resolve_options("in", "o.h5", strategy="internvl", model="timm:test_resnet", random_init=True)
    assert res.strategy_cfg.max_tiles == StrategyCfg.max_tiles
    from s2cli.commands import options as o

    for name, decl in OPTION_DECLS.items():  # the command line's parameter of each option is made from it
        if decl.flags:
            info = o.OPTIONS[name][0].__metadata__[0]
            assert (info.default, *info.param_decls) == decl.flags or tuple(info.param_decls) == decl.flags


def test_a_run_saved_before_crop_rounding_was_recorded_resumes_and_another_rounding_is_refused(tmp_path, image_dir):
    import json

    import s2cli

    tiny = dict(model="timm:test_resnet", random_init=True, img_sizes=(64, 128), max_split_size=64, workers=0)
    out = tmp_path / "o"
    s2cli.extract(str(image_dir), f"{out}/", **tiny)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["backbone"]["crop_round"] == "floor"
    del run["config"]["backbone"]["crop_round"]  # as an older version saved it: it cropped with the floor then
    (out / "run.json").write_text(json.dumps(run))
    assert s2cli.extract(str(image_dir), f"{out}/", **tiny).num_images == 0  # resumed: all done
    run["config"]["backbone"]["crop_round"] = "half-even"
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(ConfigError, match="backbone.crop_round: 'half-even' -> 'floor'"):
        s2cli.extract(str(image_dir), f"{out}/", **tiny)
