"""The tools' user errors (eomt/cli.py): one line `error: ...` on stderr, exit status 2."""

import importlib

import pytest

from eomt.cli import run_tool

TOOLS = [
    "train_net", "evaluate", "evaluate_checkpoints", "benchmark", "convert_checkpoint", "sweep",
    "predict", "serve", "export_onnx", "benchmark_serve", "report",
]  # fmt: skip


@pytest.mark.parametrize("name", TOOLS)
def test_a_missing_argument_is_one_line(name, capsys):
    tool = importlib.import_module(f"tools.{name}")
    with pytest.raises(SystemExit) as stopped:
        tool.parse_args(["--no-such-option"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "name, argv, message",
    [
        ("train_net", ["--config-file", "missing.yaml"], "missing.yaml"),
        ("evaluate", ["instance", "--gt-json", "gt.json", "--pred-json", "p.json"], "gt.json"),
        ("evaluate_checkpoints", ["--run", "no_run_here"], "no_run_here"),
        ("benchmark", ["--config-file", "missing.yaml"], "missing.yaml"),
    ],
)
def test_a_missing_file_is_one_line(name, argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tool = importlib.import_module(f"tools.{name}")
    main = tool.launch_main if name == "train_net" else tool.main
    parse = None if name in ("evaluate", "evaluate_checkpoints") else tool.parse_args
    with pytest.raises(SystemExit) as stopped:
        run_tool(main, parse, argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
