"""The `spaceclip` command itself (flows/cli.py): help, usage errors, the options that stand for `--set`s, exit
codes. The flows are replaced by stand-ins that record what the command passes them; no Prefect, no run."""

from __future__ import annotations

import typer

import flows.cli
from flows.cli import main
from tests.conftest import keep_main_env


def commands(group, prefix=()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def test_every_command_and_option_is_documented(capsys, monkeypatch):
    keep_main_env(monkeypatch)
    found = dict(commands(typer.main.get_command(flows.cli.app)))
    assert set(found) == {("extract",), ("train",), ("evaluate",), ("run",), ("predict",), ("import",), ("serve",),
                          ("version",), ("data", "synth"), ("data", "check"), ("cache", "verify"),
                          ("export", "onnx"), ("encoder", "prepare")}
    for path, cmd in found.items():
        assert cmd.help and cmd.short_help, path
        for param in cmd.params:
            assert param.help, (path, param.name)  # options and arguments alike
    assert main([]) == 0  # no command: the help, as `--help`
    out = capsys.readouterr().out
    assert "Commands:" in out and "the main job: extract -> train -> evaluate -> table + pictures" in out
    assert "spaceclip run --config demo" in out  # the module docstring's examples
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--config NAME|FILE", "--sweep NAME|FILE", "--set KEY=VALUE", "--variants A,B", "--dask-address",
                   "--ignore-disk-space", "--verify-cache", "--seeds N", "--allow-partial"):
        assert option in out, option


def test_usage_errors_exit_2_with_the_usage(capsys, monkeypatch):
    keep_main_env(monkeypatch)
    assert main(["run", "--bogus"]) == 2
    assert "No such option: --bogus" in capsys.readouterr().err
    assert main(["data"]) == 2  # a group needs its action
    assert main(["predict", "x.png"]) == 2
    assert "Missing option '--checkpoint'" in capsys.readouterr().err
    assert main(["data", "synth", "--layout", "cityscapes"]) == 2
    assert "'cityscapes' is not one of 'kitti', 'nyu'" in capsys.readouterr().err


def test_flags_and_seeds_reach_the_flows_as_overrides(flow_calls, capsys):
    assert main(["run", "--set", "train.seed=5", "--seeds", "3", "--allow-partial", "--variants", "full, film",
                 "--sweep", "table2"]) == 0
    run = flow_calls[-1]
    assert run["overrides"] == ["train.seed=5", "eval.allow_partial=true", "train.seeds=[5, 6, 7]"]
    assert (run["config"], run["sweep"], run["variants"], run["dask_address"]) == ("demo", "table2",
                                                                                   ["full", "film"], None)
    assert main(["train", "--no-resume", "--set", "train.epochs=1", "--set", "train.lr=0.01"]) == 0
    assert flow_calls[-1]["overrides"] == ["train.epochs=1", "train.lr=0.01"] and flow_calls[-1]["resume"] is False
    assert main(["extract", "--splits", "train,test", "--dask-address", "tcp://h:8786"]) == 0
    assert flow_calls[-1]["splits"] == ["train", "test"] and flow_calls[-1]["dask_address"] == "tcp://h:8786"
    assert main(["evaluate", "--seeds", "0"]) == 2  # a user error: one line, no flow run
    assert capsys.readouterr().err == "error: --seeds 0: give at least 1 seed\n"
    assert main(["evaluate", "--set", "train.nope=1"]) == 2  # a bad --set fails before any server starts
    assert "train.nope" in capsys.readouterr().err and len(flow_calls) == 3


def test_interrupt_is_exit_130_with_what_is_kept(monkeypatch, capsys):
    keep_main_env(monkeypatch)

    def interrupted(verbose):
        raise KeyboardInterrupt

    monkeypatch.setattr(flows.cli, "print_version", interrupted)
    assert main(["version"]) == 130
    assert capsys.readouterr().err == "interrupted: finished chunks and epochs are kept; the same command resumes\n"


def test_encoder_prepare(tmp_path, monkeypatch, capsys):
    """`spaceclip encoder prepare NAME`: the folder of a packaged preset (converted here first when missing; a bad
    wheel is one error line), nothing for any other encoder."""
    keep_main_env(monkeypatch)
    assert main(["encoder", "prepare", "tiny-clip"]) == 0
    assert capsys.readouterr().out == "tiny-clip: nothing to prepare (not packaged)\n"
    monkeypatch.setenv("SPACECLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPACECLIP_IMGFOCUS_WHEEL", str(tmp_path / "absent.whl"))
    assert main(["encoder", "prepare", "dinov2-small-imgfocus"]) == 2
    assert capsys.readouterr().err.endswith("absent.whl: no such file\n")
    folder = tmp_path / "cache" / "dinov2-small-imgfocus"
    folder.mkdir(parents=True)
    for name in ("verified.json", "model.safetensors"):  # what a finished conversion leaves
        (folder / name).write_text("{}")
    assert main(["encoder", "prepare", "dinov2-small-imgfocus"]) == 0
    assert capsys.readouterr().out == f"dinov2-small-imgfocus: {folder}\n"
