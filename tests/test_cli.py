"""The ``phi3data`` command: every command's --help, one bad input per command, one error rule, no heavy imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import typer
from conftest import JSONL_DIR, ROOT, SHARED, require_shared
from typer.testing import CliRunner

from phi3data.cli import app
from phi3data.cli.errors import USER_ERROR_EXIT, add_command, user_error_message

# Every command, as typed after `phi3data`.
COMMANDS = [
    ["run"], ["quickstart"],
    ["classify", "annotate"], ["classify", "train"], ["classify", "evaluate"],
    ["generate"], ["fetch"], ["tokenize"], ["mix"],
    ["model", "info"], ["train"], ["eval"], ["ablate"], ["sandbox", "run"], ["report"], ["export", "gguf"],
    ["synth-images"],
]

# Packages a core install (no extras) lacks.
HEAVY = ["torch", "pyspark", "ray", "sklearn", "onnxruntime", "transformers", "tiktoken"]


def _command_paths(command, prefix=()) -> list[list[str]]:
    """The leaf commands of a click group, as argument lists."""
    subcommands = getattr(command, "commands", None)
    if subcommands is None:
        return [list(prefix)]
    return [path for name, sub in subcommands.items() for path in _command_paths(sub, (*prefix, name))]


def test_the_command_list_is_complete():
    assert sorted(_command_paths(typer.main.get_command(app))) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_shows_an_example(command):
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"Example: phi3data {' '.join(command)} " in result.output


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Per command: arguments with one mistake, and the text the error message must contain."""
    recipe = tmp / "recipe.toml"
    recipe.write_text('[pipeline]\nname = "x"\n[[stage]]\ntype = "extract"\nextracter = "resiliparse"\n')
    classifier = tmp / "classifier.toml"
    classifier.write_text((ROOT / "classifiers" / "edu_fasttext_textbooks.toml").read_text()
                          .replace("\nepoch = ", "\nepochz = "))
    plan = tmp / "plan.toml"
    plan.write_text((ROOT / "generators" / "textbooks.toml").read_text().replace("\nseed = ", "\nsede = ")
                    .replace('"templates/', f'"{ROOT}/generators/templates/'))
    mix = tmp / "mix.toml"
    mix.write_text((ROOT / "mixes" / "phase_example.toml").read_text().replace("\nmax_epochs =", "\nmax_epoch ="))
    ladder = tmp / "ladder.toml"
    ladder.write_text((ROOT / "model" / "ladder-quickstart.toml").read_text()
                      .replace("\ntokens_per_param =", "\ntokens_per_parm ="))
    (tmp / "no-classifier").mkdir()
    labelled = str(require_shared(SHARED / "quality" / "dclm_majority_labeled.jsonl"))
    jsonl = str(require_shared(JSONL_DIR))
    return {
        "run": (["run", str(recipe), "--input", jsonl, "--output", str(tmp / "o")], "extracter"),
        "quickstart": (["quickstart", "--data", str(tmp / "nowhere"), "--output", str(tmp / "q")], "nowhere"),
        "classify annotate": (["classify", "annotate", str(tmp / "missing.jsonl"), "-o", str(tmp / "a.jsonl"),
                               "--dry-run"], "missing.jsonl"),
        "classify train": (["classify", "train", str(classifier)], "epochz"),
        "classify evaluate": (["classify", "evaluate", str(tmp / "no-classifier"), labelled], "no-classifier"),
        "generate": (["generate", str(plan), "--output", str(tmp / "g")], "sede"),
        "fetch": (["fetch", str(tmp / "no-urls.txt"), "--output", str(tmp / "f")], "no-urls.txt"),
        "tokenize": (["tokenize", jsonl, "--output", str(tmp / "t"), "--tokenizer", "no-such-tokenizer"],
                     "no-such-tokenizer"),
        "mix": (["mix", str(mix), "--output", str(tmp / "m")], "max_epoch"),
        "model info": (["model", "info", "no-such-model"], "no-such-model"),
        "sandbox run": (["sandbox", "run", str(tmp / "missing.py"), "--allow-code-execution"], "missing.py"),
        "train": (["train", str(ROOT / "model" / "train-tiny-cpu.toml"), "max_steps"], "max_steps"),
        "eval": (["eval", str(tmp / "no-checkpoint"), "--tokenizer", "phi3-mini"], "no-checkpoint"),
        "ablate": (["ablate", str(ladder), "--output", str(tmp / "l")], "tokens_per_parm"),
        "report": (["report", str(tmp / "no-run")], "no-run"),
        "export gguf": (["export", "gguf", str(tmp / "no-checkpoint"), "--output", str(tmp / "x.gguf")],
                        "no-checkpoint"),
        "synth-images": (["synth-images", "--kind", "nope", "--count", "1", "--output", str(tmp / "s")], "nope"),
    }


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_bad_input_is_one_error_line_and_exit_code_2(command, tmp_path):
    args, named = _bad_inputs(tmp_path)[" ".join(command)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == USER_ERROR_EXIT, result.output + repr(result.exception)
    assert result.stderr.startswith("error: ") and named in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "m").exists()


def test_bad_input_from_the_console_script(tmp_path):
    args, named = _bad_inputs(tmp_path)["run"]
    proc = subprocess.run([sys.executable, "-m", "phi3data.cli", *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == USER_ERROR_EXIT
    assert proc.stderr.startswith("error: ") and named in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_unexpected_errors_keep_their_traceback():
    group = typer.Typer()

    def broken() -> None:
        """A command with a bug."""
        raise KeyError("a bug, not a user error")

    def checked(path: Path) -> None:
        """A command whose input is missing."""
        path.read_text()

    add_command(group, "broken", broken)
    add_command(group, "checked", checked)
    bug = CliRunner().invoke(group, ["broken"])
    assert isinstance(bug.exception, KeyError) and bug.exit_code == 1
    missing = CliRunner().invoke(group, ["checked", "/nonexistent/phi3data-input.txt"])
    assert missing.exit_code == USER_ERROR_EXIT and "phi3data-input.txt" in missing.stderr


def test_which_errors_are_user_errors():
    assert user_error_message(ValueError("bad value")) == "bad value"
    assert user_error_message(FileNotFoundError("no such file")) == "no such file"
    assert "phi3data[train]" in user_error_message(ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert user_error_message(ModuleNotFoundError("No module named 'phi3data.nope'", name="phi3data.nope")) is None
    assert user_error_message(KeyError("x")) is None
    assert user_error_message(RuntimeError("internal")) is None
    try:
        try:
            import phi3data_no_such_extra  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("the x engine needs `pip install x`") from exc
    except RuntimeError as exc:
        assert user_error_message(exc) == "the x engine needs `pip install x`"


def _core_install_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python cannot import the optional heavy packages, like an install without extras."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys

        BLOCKED = {set(HEAVY)!r}

        class BlockHeavyImports:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
                return None

        sys.meta_path.insert(0, BlockHeavyImports())
    """))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    return env


def test_run_needs_no_optional_package(tmp_path):
    """`phi3data run` on JSONL, with its local workers, imports none of torch, Spark, Ray, sklearn, ..."""
    env = _core_install_env(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "phi3data.cli", "run", str(ROOT / "pipelines" / "raw.toml"),
                           "--input", str(require_shared(JSONL_DIR)), "--output", str(out), "--workers", "2",
                           "--no-progress"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list((out / "data").glob("*.parquet"))
    stats = json.loads((out / "stats.json").read_text())
    assert stats, "stats.json is empty"

    # The blocker is really active: a command that needs torch says which extra to install.
    info = subprocess.run([sys.executable, "-m", "phi3data.cli", "model", "info", "phi-3-mini"],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert info.returncode == USER_ERROR_EXIT, info.stdout + info.stderr
    assert "pip install 'phi3data[train]'" in info.stderr and "Traceback" not in info.stderr


def test_unknown_ladder_size_is_a_user_error():
    result = CliRunner().invoke(app, ["model", "info", "ladder-cpu:s9"])
    assert result.exit_code == USER_ERROR_EXIT, result.output + repr(result.exception)
    assert result.stderr.startswith("error: ") and "size 's9' not in ladder-cpu; available: s1" in result.stderr
