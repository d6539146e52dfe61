"""What a new user meets: the README's first run as written, the examples from another folder, `--help` with its
defaults and choices, shell completion, `s2 inspect --keys`, `s2 recipes` and `s2 models` at 80 columns."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import caller_env
from s2cli.cli import app

ROOT = Path(__file__).parent.parent


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
    return r.stdout


def _commands(cmd=None, path: tuple[str, ...] = ()):
    """Every command of `s2`, groups included, as (its words after `s2`, its click command)."""
    if cmd is None:
        from typer.main import get_command

        cmd = get_command(app)
    yield path, cmd
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield from _commands(sub, (*path, name))


COMMANDS = [" ".join(p) for p, _ in _commands()]


def test_help_shows_defaults_choices_and_panels(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    text = " ".join(_help(cli, "extract").split())
    assert re.search(r"-b, --batch-size INTEGER Images per batch\. \[default: 8\]", text)
    assert "--fit crop|squash|pad|keep" in text and "--strategy s2|dynamic-s2|anyres|internvl|native|dual" in text
    for panel in ("Common options", "Input", "Model", "Scales and tiles", "Strategy", "Output", "Speed", "Run control"):
        assert f" {panel}: " in text
    assert text.index("Common options:") < text.index("Input:") and "Examples:" in text


def _words(text: str) -> list[str]:
    """The words of a help text, a shell line's continuation ` \\` left out: what wrapping cannot change."""
    return [w for w in text.split() if w != "\\"]


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_the_terminal_with_nothing_cut(command, columns):
    """Every command's help at 80 and 120 columns: no line wider than the terminal, no cut (`…`, a truncated
    listing) and no word split across lines (a flag, a choice, a default, a hyphenated name): its words are the
    words of the same help laid out on a line of 10,000 columns, in the same order."""
    runner = CliRunner()
    args = [*command.split(), "--help"]
    r = runner.invoke(app, args, terminal_width=columns)  # as COLUMNS sets it outside CliRunner (which forces 80)
    assert r.exit_code == 0, r.output
    wide = runner.invoke(app, args, terminal_width=10_000, max_content_width=10_000)
    assert wide.exit_code == 0, wide.output
    lines = r.stdout.splitlines()
    assert max(map(len, lines)) <= columns, [line for line in lines if len(line) > columns]
    assert "…" not in r.stdout
    assert _words(r.stdout) == _words(wide.stdout)  # nothing cut short for want of room (click's "..."), nor split
    if columns == 120:  # the room is used: the option table is not held to 80 columns
        assert max(map(len, lines)) > 80 or max(map(len, wide.stdout.splitlines())) <= 80


def test_the_help_test_sees_a_cut_and_a_split_word():
    assert _words("--frames-as-imag… x") != _words("--frames-as-images x")
    assert _words("float32|float16|bfl\n  oat16") != _words("float32|float16|bfloat16")
    assert _words("s2 extract a \\\n    -o b") == _words("s2 extract a -o b")


def test_every_command_is_in_the_help_test():
    assert {"extract", "inspect", "export", "models", "fetch", "bench", "slurm", "status", "recipes",
            "recipes show", "viz", "viz plan", "viz features", ""} <= set(COMMANDS)


def _completions(*args: str) -> list[str]:
    """What shell completion offers for the last word of `s2 ARGS` (click's completion API, as bash asks it)."""
    from typer._completion_classes import BashComplete
    from typer.main import get_command

    *done, incomplete = args
    return [c.value for c in BashComplete(get_command(app), {}, "s2", "_S2_COMPLETE").get_completions(done, incomplete)]


def test_completion_offers_model_aliases_family_prefixes_and_recipes(monkeypatch):
    from s2cli import backbones
    from s2cli.commands.complete import family_prefixes
    from s2cli.config import list_recipes

    aliases = [m.name for m in backbones.list_models()]
    assert {"timm:", "hf:"} <= set(family_prefixes())
    assert _completions("extract", "x", "--model", "") == aliases + family_prefixes()
    assert _completions("extract", "x", "-m", "clip") == [a for a in aliases if a.startswith("clip")]
    assert _completions("extract", "x", "-m", "ti") == ["timm:"]
    assert _completions("fetch", "dino") == [a for a in aliases if a.startswith("dino")]
    assert _completions("recipes", "show", "") == sorted(list_recipes())
    assert _completions("bench", "--recipe", "llava") == sorted(n for n in list_recipes() if n.startswith("llava"))
    assert _completions("extract", "x", "--fit", "") == ["crop", "squash", "pad", "keep"]
    # read from the registry: an alias registered later is offered too
    toy = backbones.list_models()[0]
    monkeypatch.setattr(backbones, "list_models", lambda: [toy, type(toy)(**{**toy.to_dict(), "name": "zz-toy"})])
    assert _completions("extract", "x", "--model", "zz") == ["zz-toy"]


def test_every_model_and_recipe_parameter_completes():
    """Whichever command takes --model, --recipe or MODELS (now or added later) completes them."""
    found = 0
    for path, cmd in _commands():
        for param in cmd.params:
            if param.name in ("model", "models", "recipe"):
                word = (param.opts[-1],) if param.param_type_name == "option" else ()
                args = [*path, *(["x"] if path[-1:] in (("extract",), ("slurm",), ("plan",)) else []), *word]
                assert _completions(*args, ""), (path, param.name)
                found += 1
    assert found >= 8


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
    rule = next(i for i, line in enumerate(lines) if line.strip() and not line.strip(" ━─┡┩╇┼╪"))
    header = lines[rule - 1].replace("┃", "  ")
    assert len(re.split(r"\s{2,}", header.strip())) >= 5, header  # every column kept its header


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


# ---- quiet means quiet ----------------------------------------------------------------------------------------------
def _s2(*args, cwd):
    return subprocess.run([sys.executable, "-m", "s2cli", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


SUMMARY = r"\d+ entr(y|ies), 0 failed -> \S+ \([\d.]+ img/s\)\n"


@pytest.mark.slow
def test_quiet_first_run_prints_the_summary_line_only(tmp_path):
    """The README's first run with -q, in a process of its own as a user runs it: one line on stderr, nothing on
    stdout; with --json, the JSON on stdout and nothing on stderr."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    r = _s2("extract", "examples/images", "-q", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == "" and re.fullmatch(SUMMARY, r.stderr), r.stderr
    r = _s2("extract", "examples/images", "-q", "--json", "--limit", 2, "-o", "two.h5", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "" and json.loads(r.stdout)["num_images"] == 2, r.stderr


def tiny_clip_repo(folder: Path) -> Path:
    """A tiny random CLIP vision tower with its image processor, as save_pretrained writes them."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from conftest import TINY

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TINY)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_a_hub_download_with_q_prints_the_summary_line_only(hub, tmp_path):
    """A first use that downloads from the (loopback) hub and loads through transformers' from_pretrained: with -q
    not one progress bar or log line of huggingface_hub or transformers ("Fetching 3 files", "Loading weights");
    without -q, stderr not being a terminal, no progress bar either."""
    from conftest import write_image

    hub.add("org/tiny-clip", tiny_clip_repo(tmp_path / "clip"))
    hub.add("org/tiny-clip-2", tmp_path / "clip")
    for i in range(2):
        write_image(tmp_path / "imgs" / f"{i}.png", (40, 60), i)
    r = _s2("extract", "imgs", "-m", "hf:org/tiny-clip", "-o", "a.h5", "-q", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == "" and re.fullmatch(SUMMARY, r.stderr), r.stderr
    r = _s2("extract", "imgs", "-m", "hf:org/tiny-clip-2", "-o", "b.h5", cwd=tmp_path)
    assert r.returncode == 0 and "%|" not in r.stderr and "Fetching" not in r.stderr, r.stderr
    assert re.search(SUMMARY, r.stderr), r.stderr


def test_quiet_restores_the_libraries_after_the_command(cli, image_dir, tmp_path):
    """-q turns the libraries' bars and loggers off for the command only (an in-process caller keeps its own)."""
    import logging

    from huggingface_hub.utils import are_progress_bars_disabled

    logging.getLogger("transformers").setLevel(logging.INFO)
    r = cli("extract", image_dir, "-m", "timm:test_resnet", "--random-init", "--img-sizes", "64", "--max-split-size",
            "64", "-j", 0, "-o", tmp_path / "o.h5", "-q")
    assert r.exit_code == 0 and r.stderr == "" or re.fullmatch(SUMMARY, r.stderr), r.stderr
    assert logging.getLogger("transformers").level == logging.INFO and not are_progress_bars_disabled()
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ and "TRANSFORMERS_VERBOSITY" not in os.environ


# ---- the suite sets every variable it depends on -------------------------------------------------------------------
HOSTILE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "HF_HUB_ENABLE_HF_TRANSFER": "1", "HF_HUB_CACHE": "/nonexistent/hub", "HF_TOKEN": "hf_not_a_token",
           "S2CLI_HUB_TIMEOUT": "0.001", "S2CLI_PROGRESS_S": "0", "S2CLI_SPOOL": "/nonexistent",
           "COLUMNS": "40", "FORCE_COLOR": "1", "RANK": "1", "WORLD_SIZE": "2"}


def test_the_callers_variables_are_cleared():
    assert caller_env({**HOSTILE, "PATH": "/bin", "HOME": "/root", "S2CLI_REQUIRE_SLURM": "1"}) == sorted(HOSTILE)
    # what is left is the test's own: an empty cache of its own and a hub endpoint on loopback
    assert caller_env() == ["HF_ENDPOINT", "HF_HOME"], "a variable of the caller reached the test"
    assert os.environ["HF_ENDPOINT"].startswith("http://127.0.0.1:") and not os.listdir(os.environ["HF_HOME"])


def test_a_hub_download_in_process(hub, cli, tmp_path):
    """A first use that downloads from the loopback hub, in process: what the next test runs in a hostile
    environment."""
    from conftest import write_image

    hub.add("org/tiny-clip", tiny_clip_repo(tmp_path / "clip"))
    write_image(tmp_path / "imgs" / "a.png", (40, 60), 1)
    r = cli("extract", tmp_path / "imgs", "-m", "hf:org/tiny-clip", "-o", tmp_path / "a.h5", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["num_images"] == 1, r.stderr


@pytest.mark.slow
def test_the_suite_passes_whatever_the_caller_exports(tmp_path):
    """HF_HUB_OFFLINE=1 (a cluster node), a narrow COLUMNS, torchrun's RANK, ...: a hub download and the help
    test still pass, because conftest clears them for every test (and before huggingface_hub is imported)."""
    env = {**os.environ, **HOSTILE}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "-n", "0",
                        f"{__file__}::test_a_hub_download_in_process", f"{__file__}::test_the_callers_variables_are_cleared",
                        f"{__file__}::test_help_fits_the_terminal_with_nothing_cut[extract-80]"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "3 passed" in r.stdout, r.stdout[-3000:]


# ---- docs that cannot drift ------------------------------------------------------------------------------------------
def test_the_docs_say_what_the_code_does():
    """The model aliases, the recipes, the extract synopsis and every command's options in README.md and docs/ are
    the ones the registries and the commands declare (generated by `python -m s2cli.reference`)."""
    from s2cli import reference

    assert reference.stale() == [], "the docs and the code disagree: run `python -m s2cli.reference`"


def test_an_alias_added_to_the_code_only_makes_the_docs_stale(monkeypatch):
    import dataclasses

    from s2cli import backbones, reference

    real = backbones.list_models()
    monkeypatch.setattr(backbones, "list_models", lambda: [*real, dataclasses.replace(real[-1], name="toy-alias")])
    assert reference.stale() == ["docs/models.md"]
    assert "`toy-alias`" in reference.models_table()


def test_a_generated_block_removed_from_a_doc_is_stale(tmp_path):
    from s2cli import reference

    for file, text in reference.expected().items():
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_text(text)
    assert reference.stale(tmp_path) == []
    text = (tmp_path / "README.md").read_text()
    (tmp_path / "README.md").write_text(reference.BLOCK.sub("", text))
    assert reference.stale(tmp_path) == ["README.md (no block recipes)"]


# ---- every command line of the docs runs -----------------------------------------------------------------------------
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# why a line of the docs cannot run on an offline CPU box (first match wins); every other line is run
CANNOT = [
    (r"^pip install", "installs packages (CI runs the README's install)"),
    (r"s3://|gs://|https?://", "an object store or a web server"),
    (r"\b(srun|sbatch|torchrun|watch)\b|--submit|--devices all|--device cuda", "GPUs or a SLURM cluster"),
    (r"\s\[-|\bINPUT\b|\bOUTDIR/", "a synopsis, not a command"),
    (r"\bs2 fetch\b", "the hub"),
    (r"\bs2 probe\b", "labelled data, which the docs' folders are not (tests/test_probe.py runs `s2 probe`)"),
]


def doc_lines(path: Path) -> list[list[str]]:
    """The command lines of a document's bash blocks, block by block: comments dropped, continued lines joined (a
    block holding a script's text, `#!...`, is not a list of commands)."""
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        if block.startswith("#!"):
            continue
        lines = []
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                lines.append(line)
        blocks.append(lines)
    return blocks


def needs_the_hub(line: str) -> bool:
    """An extraction (or `s2 slurm`, which fetches) with hub weights: its model (or its recipe's) is not the
    default one, whose weights ship with a package, and neither --random-init nor --dry-run is given."""
    from s2cli.config import ExtractConfig, load_recipe

    m = re.search(r"\bs2 (extract|slurm|bench)\b", line)
    if not m or re.search(r"--random-init|--dry-run|--weights", line):
        return False
    model = re.search(r"(?:--model|-m)[ =](\S+)", line)
    recipe = re.search(r"--recipe[ =](\S+)", line)
    name = model[1] if model else load_recipe(recipe[1])[0].get("model") if recipe else ExtractConfig.model
    return name != ExtractConfig.model


def why_not(line: str) -> str | None:
    for pattern, reason in CANNOT:
        if re.search(pattern, line):
            return reason
    return "the hub's weights" if needs_the_hub(line) else None


@pytest.fixture(scope="module")
def doc_inputs(tmp_path_factory) -> Path:
    """What the docs' commands name, made once: examples/, photos/ (cats/001 among them), photos.h5 and feats/
    written from them (feats/ with the default settings, as a document's own `-o feats/` writes it), clips/ with a
    short video; `s2` and `python` on PATH are this checkout's. Each document's run gets a copy."""
    return _sandbox(tmp_path_factory.mktemp("doc-inputs"))


def _sandbox(d: Path) -> Path:
    import shutil

    import av
    import numpy as np

    import s2cli

    (d / "examples").symlink_to(ROOT / "examples")
    shutil.copytree(ROOT / "examples" / "images", d / "photos")
    (d / "photos" / "cats").mkdir()
    shutil.copy(ROOT / "examples" / "images" / "chelsea.jpg", d / "photos" / "cats" / "001.jpg")
    tiny = dict(model="timm:test_resnet", random_init=True, img_sizes=(64,), max_split_size=64, workers=0)
    s2cli.extract(str(d / "photos"), str(d / "photos.h5"), **tiny)
    s2cli.extract(str(d / "photos"), f"{d / 'feats'}/", workers=0)
    (d / "clips").mkdir()
    with av.open(str(d / "clips" / "cat.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(12):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    (d / "bin").mkdir()
    for name, cmd in (("s2", f"{sys.executable} -m s2cli"), ("python", sys.executable)):
        (d / "bin" / name).write_text(f'#!/bin/sh\nexec {cmd} "$@"\n')
        (d / "bin" / name).chmod(0o755)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_line_of_the_docs_runs_offline(doc, tmp_path, request):
    """Each bash block of the document runs as written, line by line in one shell (a `cd` holds for its block),
    offline (HF_HUB_OFFLINE=1), in a folder holding what the commands name (/tmp/ there too); a line that cannot
    run here is left out for the reason `why_not` gives, and a document's lines are not all left out."""
    blocks = doc_lines(doc)
    run = [[line for line in b if why_not(line) is None] for b in blocks]
    if not any(run):
        return  # a document with no command that runs here (test_the_docs_lines_left_out... counts them all)
    import shutil

    d = tmp_path / "d"
    shutil.copytree(request.getfixturevalue("doc_inputs"), d, symlinks=True)
    first = next((line for b in run for line in b if "feats/" in line), "")
    if re.search(r"-o feats/", first):  # the document writes feats/ itself before it reads it
        shutil.rmtree(d / "feats")
    env = {**os.environ, "PATH": f"{d / 'bin'}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    for lines in filter(None, run):
        script = "".join(f"{line.replace('/tmp/', f'{d}/tmp/')}\necho \"@@ $?\"\n" for line in lines)
        r = subprocess.run(["bash", "-c", f"mkdir -p {d}/tmp; cd {d}\n{script}"], env=env, capture_output=True,
                           text=True, timeout=900)
        codes = [int(c) for c in re.findall(r"^@@ (\d+)$", r.stdout, re.M)]
        assert len(codes) == len(lines), (lines, r.stdout[-2000:], r.stderr[-2000:])
        for line, code in zip(lines, codes):
            assert code == 0 or "kill " in line, (line, code, r.stderr[-3000:])


def test_the_docs_lines_left_out_are_the_ones_that_cannot_run_here():
    assert why_not("pip install -e .") and why_not("s2 fetch clip-vit-l-336")
    assert why_not("s2 extract photos/ --model clip-vit-l-336 -o photos.h5") == "the hub's weights"
    assert why_not("s2 extract photos/ --recipe llava-1.5-s2 -o a.h5") == "the hub's weights"
    assert why_not("s2 slurm INPUT -o OUTDIR/ [extract options] --nodes N") == "a synopsis, not a command"
    for runnable in ("s2 extract examples/images", "s2 extract photos/ --recipe llava-1.5-s2 --random-init --dry-run",
                     "s2 viz plan clips/cat.mp4 --recipe llava-1.5-s2 --num-frames 8 -o frames.png",
                     "s2 inspect photos.h5 --key cats/001", "s2 extract examples/images -o /tmp/run/ --shard-size 3"):
        assert why_not(runnable) is None, runnable
    readme = [line for b in doc_lines(ROOT / "README.md") for line in b]
    assert "s2 extract examples/images && s2 inspect images.efficientnet-lite0.h5" in readme
    runs = [line for doc in DOCS for b in doc_lines(doc) for line in b if why_not(line) is None]
    assert len(runs) >= 15, runs  # most of the docs' lines run here


def test_status_reads_at_80_columns(cli, tmp_path):
    """`s2 status` of a rank at work: every column keeps its header and values, the unit in flight (as long as
    its path) is said whole on its own line, nothing is cut."""
    import time

    from conftest import FAST, write_image

    for i in range(3):
        write_image(tmp_path / "a-rather-long-folder-name-for-the-images" / f"{i}.png", (40, 60), i)
    out = tmp_path / "out"
    assert cli("extract", tmp_path / "a-rather-long-folder-name-for-the-images", *FAST, "-o", f"{out}/", "-q",
               "--shard-size", 2).exit_code == 0
    hb = out / "rank-00000.json"
    unit = f"{tmp_path / 'a-rather-long-folder-name-for-the-images'}[0:2]"
    beat = {**json.loads(hb.read_text()), "state": "running", "pid": os.getpid(), "updated": time.time(),
            "unit": unit, "part": 0, "shard": "part-00000-00000.h5"}
    hb.write_text(json.dumps(beat))
    r = cli("status", out)
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in r.stdout, r.stdout
    header = next(line for line in lines if "rank" in line and "state" in line)
    assert header.split() == ["rank", "state", "host:pid", "shards", "entries", "failed", "img/s", "updated"]
    said = f"rank 0 in flight: {unit} part 0 -> part-00000-00000.h5"
    assert "".join(said.split()) in "".join(r.stdout.split())  # a path longer than a line is folded


def test_every_command_that_writes_takes_o():
    """A command with an output (a file, a folder, a picture) names it with -o/--output, as `s2 extract` does."""
    writers = {" ".join(path) for path, cmd in _commands() for p in cmd.params
               if p.param_type_name == "option" and "-o" in p.opts}
    assert {"extract", "export", "slurm", "viz plan", "viz features"} <= writers
    for path, cmd in _commands():
        for p in cmd.params:
            if p.name == "output":
                assert "-o" in p.opts and "--output" in p.opts, (path, p.opts)
