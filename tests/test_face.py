"""What a new user meets: the README's first run as written, the examples from another folder, `--help` with its
defaults and choices, shell completion, `s2 inspect --keys`, `s2 recipes` and `s2 models` at 80 columns."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def _first_run_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Install and first run", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_readme_first_run_works_as_written(tmp_path):
    """The install lines need a network and minutes (CI does them); every `s2` line runs here, in a folder of
    the user's own beside a copy of `examples/`."""
    commands = _first_run_commands()
    assert any(c.startswith("pip install") for c in commands)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    ran = 0
    for line in commands:
        for cmd in line.split("&&"):
            cmd = cmd.strip()
            if cmd.startswith("s2 "):
                r = subprocess.run([sys.executable, "-m", "s2cli", *cmd.split()[1:]], cwd=tmp_path,
                                   capture_output=True, text=True, timeout=600)
                assert r.returncode == 0, (cmd, r.stderr)
                ran += 1
    assert ran == 2 and (tmp_path / "images.efficientnet-lite0.h5").is_file()


@pytest.mark.slow
def test_examples_run_from_another_folder(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "python_api.py"), "--random-init"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "features (1, 197, 128)" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "python_api.py")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "no weights given" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "make_shards.py"), "shards"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and sorted(p.name for p in (tmp_path / "shards").glob("*.tar")) == ["000000.tar",
                                                                                                 "000001.tar"]


def _help(cli, *args) -> str:
    r = cli(*args, "--help")
    assert r.exit_code == 0, r.stderr
    return re.sub(r"[│╭╮╰╯─]", " ", r.stdout)


def test_help_shows_defaults_choices_and_panels(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    text = " ".join(_help(cli, "extract").split())
    assert re.search(r"--batch-size -b INTEGER Images per batch\. \[default: 8\]", text)
    assert "crop|squash|pad|keep" in text and "s2|dynamic-s2|anyres|internvl|native|dual" in text
    for panel in ("Input", "Model", "Scales and tiles", "Strategy", "Output", "Speed", "Run control"):
        assert f" {panel} " in text
    assert "Examples:" in text


def test_a_shown_default_does_not_override_a_recipe(cli, image_dir, tmp_path):
    """--help shows `[default: auto]` for --input-format and the default model, yet an option left out is not set:
    the recipe's model and scales stay, and `set_by` names only what was given."""
    plan = json.loads(cli("extract", image_dir, "--recipe", "vila-1.5-s2", "--dry-run", "--json").stdout)
    assert plan["model"] == "siglip-so400m-384" and plan["img_sizes"] == [384, 768]
    out = tmp_path / "o.h5"
    r = cli("extract", image_dir, "-m", "timm:test_resnet", "--random-init", "--img-sizes", "64", "--max-split-size", "64", "-j", "0",
            "-o", out, "-q")
    assert r.exit_code == 0, r.stderr
    import s2cli

    with s2cli.open_features(out) as ff:
        assert json.loads(ff.attrs["config"])["set_by"] == {"img_sizes": "flag", "max_split_size": "flag", "model": "flag",
                                                           "random_init": "flag", "workers": "flag"}


def test_shell_completion_is_installable(cli):
    text = _help(cli)
    assert "--install-completion" in text and "--show-completion" in text


def test_inspect_lists_keys(cli, image_dir, tmp_path):
    out = tmp_path / "o.h5"
    assert cli("extract", image_dir, "-m", "timm:test_resnet", "--random-init", "--img-sizes", "64", "--max-split-size", "64", "-j", "0",
               "-o", out, "-q").exit_code == 0
    r = cli("inspect", out, "--keys")
    assert r.exit_code == 0 and r.stdout.split() == ["a", "b", "d", "sub/c"]
    assert json.loads(cli("inspect", out, "--keys", "--limit", "2", "--json").stdout) == ["a", "b"]
    r = cli("inspect", out, "--key", "zzz")
    assert r.exit_code == 2 and f"s2 inspect {out} --keys" in r.stderr


@pytest.mark.parametrize("command", [["models"], ["recipes"]])
def test_tables_are_readable_at_80_columns(cli, monkeypatch, command):
    """Every column keeps a header and no cell is cut to an ellipsis (Rich collapses columns that do not fit)."""
    monkeypatch.setenv("COLUMNS", "80")
    r = cli(*command)
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in r.stdout
    header = next(line for line in lines if line.startswith("┃"))
    assert all(cell.strip() for cell in header.strip("┃").split("┃"))


def test_recipes_show_prints_the_yaml(cli):
    r = cli("recipes", "show", "llava-1.5-s2")
    assert r.exit_code == 0 and "model: clip-vit-l-336" in r.stdout
    r = cli("recipes", "show", "nope")
    assert r.exit_code == 2 and "unknown recipe" in r.stderr


@pytest.mark.slow
def test_a_wheel_ships_the_recipes_and_runs_without_the_checkout(tmp_path):
    """`pip wheel .` packs recipes/ (top level in the repository) as s2cli/recipes; installed from the wheel alone
    (not editable, the checkout out of reach), `--recipe llava-1.5-s2` plans."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                        "-w", str(tmp_path / "wheel")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "wheel").glob("s2_features-*.whl")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "site" / "s2cli" / "recipes" / "llava-1.5-s2.yaml").is_file()
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site")}
    r = subprocess.run([sys.executable, "-c", "import s2cli, sys; print(s2cli.__file__)"], env=env, cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.stdout.strip().startswith(str(tmp_path / "site")), r.stdout
    r = subprocess.run([sys.executable, "-m", "s2cli", "extract", str(ROOT / "examples" / "images"), "--recipe",
                        "llava-1.5-s2", "--random-init", "--dry-run", "--json"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert {tuple(i["output_shape"]) for i in json.loads(r.stdout)["images"]} == {(576, 3072)}


def test_every_command_ends_its_help_with_an_example(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    for command in (["extract"], ["inspect"], ["export"], ["models"], ["recipes"], ["recipes", "show"], ["bench"],
                    ["slurm"], ["status"], ["viz", "plan"], ["viz", "features"]):
        assert re.search(r"Examples?:\s+s2 ", " ".join(_help(cli, *command).split())), command
