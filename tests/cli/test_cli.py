"""The command line: one convention in every subcommand (walked through --help), the
choices and defaults shared with the API, and the spellings kept beside the new ones."""
from __future__ import annotations

import argparse
import json
import re

import pytest

from edgeinfer.cli import build_parser, main
from edgeinfer.runtime import options, sampling
from edgeinfer.runtime.loader import DEMO_MODEL


def _subparsers(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def _walk(parser: argparse.ArgumentParser, path=()):
    """(command path, parser) for every subcommand and sub-subcommand."""
    yield path, parser
    for action in _subparsers(parser):
        for name, sub in action.choices.items():
            yield from _walk(sub, (*path, name))


COMMANDS = [path for path, _ in _walk(build_parser()) if path]


def _options(parser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


def test_every_subcommand_is_walked():
    assert {("export",), ("generate",), ("inspect",), ("bench",), ("devices",), ("devices", "list"),
            ("devices", "probe")} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help_of_every_subcommand(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: edgeinfer {' '.join(path)}")
    # every command a help text names exists (`edgeinfer devices list` once did not)
    for m in re.finditer(r"(?:`|see |^\s+)edgeinfer ([a-z]+)(?: ([a-z]+))?", text, re.M):
        first, second = m.groups()
        assert (first,) in COMMANDS, m.group(0)
        has_subcommands = any(len(c) == 2 and c[0] == first for c in COMMANDS)
        if has_subcommands and second:
            assert (first, second) in COMMANDS, f"{m.group(0)!r} in the help of {' '.join(path)}"


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_one_meaning_per_flag(path):
    parser = dict(_walk(build_parser()))[path]
    opts = _options(parser)
    if "--model" in opts or path in {("generate",), ("inspect",), ("bench",)}:
        assert opts["-m"] is opts["--model"]                     # the model folder is -m everywhere
    if "--json" in opts:
        a = opts["--json"]
        assert a.nargs == 0                                      # --json: JSON on stdout, never a file
    if "--threads" in opts and opts["--threads"].help != argparse.SUPPRESS:
        assert opts["-t"] is opts["--threads"] and "compute" in opts["--threads"].help
    if "--io-threads" in opts:
        assert "read threads" in opts["--io-threads"].help
    if "--max-new-tokens" in opts:
        assert opts["-n"] is opts["--max-new-tokens"] is opts["--new-tokens"]
    if "--verify" in opts:
        assert tuple(opts["--verify"].choices) == options.VERIFY_MODES and opts["--verify"].const == "full"
    for flag, enum in (("--mode", options.MODES), ("--backend", options.BACKENDS),
                       ("--activations", options.MATMUL_ACTIVATIONS), ("--quant", options.WEIGHT_QUANTS),
                       ("--expert-low", options.EXPERT_LOW_QUANTS)):
        if flag in opts:
            assert tuple(opts[flag].choices) == enum, flag


def test_generate_defaults_are_the_apis():
    args = build_parser().parse_args(["generate", "x"])
    assert (args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty) == (
        sampling.DEFAULT_MAX_TOKENS, sampling.DEFAULT_TEMPERATURE, sampling.DEFAULT_TOP_K, sampling.DEFAULT_TOP_P,
        sampling.DEFAULT_REPETITION_PENALTY)
    defaults = sampling.SamplingConfig()
    assert (defaults.max_new_tokens, defaults.temperature) == (args.max_new_tokens, args.temperature)
    opts = options.RuntimeOptions()
    assert (args.mode, args.window, args.activations) == (opts.mode, opts.window, opts.activations)
    assert (args.backend, args.verify) == (options.DEFAULT_BACKEND, options.DEFAULT_VERIFY)


def test_prompt_positional_or_dash_p(capsys):
    assert main(["generate", "-p", "Once upon a time", "-n", "4"]) == 0
    a = capsys.readouterr().out
    assert main(["generate", "Once upon a time", "--new-tokens", "4"]) == 0
    assert capsys.readouterr().out == a and a.startswith("Once upon a time")
    assert main(["generate", "-n", "4"]) == 1
    assert "give the prompt once" in capsys.readouterr().err
    assert main(["generate", "a", "-p", "b"]) == 1


def test_bench_short_flags_and_model_spellings():
    parse = build_parser().parse_args
    new = parse(["bench", "-m", "M", "-p", "64", "-n", "16", "-r", "2", "-t", "1", "--json"])
    assert (new.model, new.prompt_tokens, new.max_new_tokens, new.runs, new.threads, new.json) == (
        "M", 64, 16, 2, 1, True)
    from edgeinfer.cli.args import model_of
    old = parse(["bench", "M", "--prompt-tokens", "64", "--new-tokens", "16", "--runs", "2", "--json-file", "r.json"])
    assert model_of(old) == "M" and (old.prompt_tokens, old.max_new_tokens, old.runs) == (64, 16, 2)
    assert (old.json, old.json_file, new.json, new.json_file) == (False, "r.json", True, None)
    from edgeinfer.errors import InvalidArgumentError
    with pytest.raises(InvalidArgumentError, match="two model folders"):
        model_of(parse(["bench", "A", "-m", "B"]))


def test_inspect_takes_dash_m_and_verify_modes(capsys):
    assert main(["inspect", "-m", str(DEMO_MODEL), "--json"]) == 0
    by_m = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(DEMO_MODEL), "--json"]) == 0          # the positional spelling
    assert json.loads(capsys.readouterr().out) == by_m
    assert {f["check"] for f in by_m["files"]} == {"not checked"}
    for argv, status in ((["--verify"], "ok"), (["--verify", "full"], "ok"), (["--verify", "sampled"], "ok (sampled)")):
        assert main(["inspect", "-m", str(DEMO_MODEL), "--json", *argv]) == 0
        assert {f["check"] for f in json.loads(capsys.readouterr().out)["files"]} == {status}


def test_inspect_sampled_verify_finds_a_corrupted_tensor(tmp_path, capsys):
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(DEMO_MODEL, folder)
    m = json.loads((folder / "manifest.json").read_text())
    first = min((t for t in m["tensors"].values()), key=lambda t: (t["file"], t["offset"]))
    with open(folder / first["file"], "r+b") as fh:      # the first tensor of a file is always sampled
        fh.seek(first["offset"])
        b = fh.read(1)
        fh.seek(first["offset"])
        fh.write(bytes([b[0] ^ 0xFF]))
    assert main(["inspect", "-m", str(folder), "--verify", "sampled"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_devices_list_and_probe_io_threads(capsys, tmp_path):
    assert main(["devices", "list"]) == 0
    listed = capsys.readouterr().out
    assert main(["devices"]) == 0 and capsys.readouterr().out == listed
    assert main(["devices", "list", "--json"]) == 0 and json.loads(capsys.readouterr().out)
    assert main(["devices", "probe", "--quick", "--io-threads", "0"]) == 1
    assert "--io-threads (read threads) must be at least 1" in capsys.readouterr().err


def test_cli_errors_are_one_line(capsys):
    """A failure the user causes ends as one `edgeinfer: error:` line and exit status 1."""
    for argv in (["generate", "x", "--temperature", "-1"], ["generate", "", "-m", str(DEMO_MODEL), "-n", "0",
                                                            "--top-p", "0"],
                 ["generate", "x", "--backend", "ort", "-e", "nosuch"], ["generate", "x", "-e", "cpu"]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("edgeinfer: error: ") and "\n" not in err, (argv, err)
