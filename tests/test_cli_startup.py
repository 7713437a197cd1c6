"""The CLI's start-up (docs/performance.md, "The CLI's start-up"): a command builds only
its own parser, and that parser reads every command line exactly as the whole tree does
-- the same arguments, the same usage errors, the same --help. No daemon: the parser
only (a diff's imports, through a real daemon: tests/test_snapshot_diff.py)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

from tools import errors, launcher
from tools.parser import COMMANDS, build_parser, walk


def _commands(p: argparse.ArgumentParser) -> list[str]:
    """The top-level commands a parser was built with."""
    return [name for path, _ in walk(p) if len(path) == 1 for name in path]


def _outcome(p: argparse.ArgumentParser, argv: list[str]) -> tuple[object, str, str]:
    """What parsing argv gives: (the arguments or the exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result: object = sorted(vars(p.parse_args(argv)).items())
        except SystemExit as e:
            result = ("exit", e.code)
    return result, out.getvalue(), err.getvalue()


# command lines of every shape: valid ones, the global options before and after the
# command (spelled out, with =, abbreviated), usage errors at each level, --help
LINES = [
    ["snapshot", "diff", "S0", "--json"],
    ["--socket", "/s", "snapshot", "diff", "S0", "S1", "-o", "offset,length", "-H", "-p"],
    ["--socket=/s", "--json", "-q", "--debug", "volume", "list", "-p"],
    ["--host", "h", "--array", "a:1", "--tls-dir", "d", "status", "--json"],
    ["--sock", "/s", "status"],
    ["-qq", "status"],
    ["--json=1", "status"],
    ["--", "status"],
    ["status", "--socket", "/t", "--quiet"],
    ["snapshot", "diff"],
    ["snapshot", "diff", "S0", "S1", "S2"],
    ["snapshot", "diff", "S0", "--bogus"],
    ["snapshot", "bogus"],
    ["snapshot"],
    ["snapshot", "create", "v", "--differential", "--plex"],
    ["snapshot", "create", "v", "w", "--context", "backup", "--hold", "--name", "n"],
    ["snapshot", "delete", "--all", "-y", "-n"],
    ["volume", "create", "v", "1G"],
    ["volume", "present", "v"],
    ["serve", "--pool", "p", "--mount", "m", "--poll-us", "2000"],
    ["serve", "--config", "c", "--no-allow-other", "--log-level", "debug"],
    ["pool", "init", "d", "--chunk-size", "4K"],
    ["pki", "init", "d", "--days", "0"],
    ["pki", "host", "h", "d", "--ca", "c"],
    ["backup", "S", "--to", "f", "--from", "B", "--format", "raw"],
    ["restore", "f"],
    ["check", "--volume", "v"], ["scrub"], ["writers", "list", "-o", "name"],
    ["bench", "--quick", "--generator", "python"], ["script", "-"], ["df", "-H"],
    ["export", "S", "-o", "f"], ["import", "f"], ["end-backup", "S"], ["demo", "--keep"],
    ["expose", "S", "--name", "n"], ["unexpose", "n"], ["revert", "S", "--force"],
    ["promote", "S"], ["split", "S", "n"],
    ["bogus"], [], ["-h"], ["--version"], ["--socket"],
]


@pytest.mark.parametrize("argv", LINES, ids=lambda a: " ".join(a) or "(none)")
def test_a_commands_parser_reads_argv_as_the_whole_tree(argv: list[str]) -> None:
    assert _outcome(build_parser(argv), argv) == _outcome(build_parser(), argv)


def test_every_help_is_the_whole_trees() -> None:
    """`shadowplex CMD [ACTION] --help` from the command's own parser: the same text."""
    paths = [path for path, _ in walk(build_parser())]
    assert len(paths) > len(COMMANDS)
    for path in paths:
        argv = [*path, "--help"]
        lazy, full = _outcome(build_parser(argv), argv), _outcome(build_parser(), argv)
        assert lazy == full and full[0] == ("exit", 0) and "usage:" in full[1], argv


def test_json_errors_are_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(errors, "JSON_ARGV", True)
    for argv in (["snapshot", "diff", "--json"], ["snapshot", "nope", "--json"]):
        assert _outcome(build_parser(argv), argv) == _outcome(build_parser(), argv)


def test_only_the_named_command_is_built() -> None:
    every = _commands(build_parser())
    assert every == list(COMMANDS)
    assert _commands(build_parser(["snapshot", "diff", "S0", "--json"])) == ["snapshot"]
    paths = [path for path, _ in walk(build_parser(["--json", "snapshot", "-q", "diff"]))]
    assert paths == [(), ("snapshot",), ("snapshot", "diff")]
    assert len(list(walk(build_parser(["snapshot", "--help", "diff"])))) == 2 + 5
    assert _commands(build_parser(["--socket", "/s", "--json", "status"])) == ["status"]
    assert _commands(build_parser(["--socket=/s", "scrub", "--volume", "v"])) == ["scrub"]
    # what the short reading cannot tell: the whole tree, and argparse says what is wrong
    for argv in (["bogus"], [], ["-h"], ["--version"], ["--sock", "/s", "status"],
                 ["--", "status"]):
        assert _commands(build_parser(argv)) == every, argv


def test_make_installs_launcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make install`'s command (tools/launcher.py): Python -IS, sys.path set by the file.
    Written from this venv with the checkout on its path (an install's site-packages),
    it runs the CLI without site; a #! line too long for Linux, or a PREFIX with a blank
    (Linux splits a #! line there), is refused."""
    out = tmp_path / "shadowplex"
    assert launcher.main([str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == f"#!{sys.prefix}/bin/python -IS" and os.access(out, os.X_OK)
    assert repr(launcher.site_dirs()) in out.read_text()
    out.write_text(launcher.text(sys.executable, [str(ROOT), *launcher.site_dirs()]))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(out), "--version"], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path), timeout=60, check=False)
    assert res.returncode == 0 and res.stdout.startswith("shadowplex "), res.stderr
    res = subprocess.run([str(out), "snapshot", "nope"], capture_output=True, text=True,
                         env=env, cwd=str(tmp_path), timeout=60, check=False)
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "invalid choice: 'nope'" in res.stderr
    monkeypatch.setattr(sys, "prefix", "/" + "p" * 130)
    assert launcher.main([str(tmp_path / "long")]) == 2
    assert not (tmp_path / "long").exists() and launcher.main([]) == 2
    for prefix in ("/opt/my venv", "/opt/tab\tvenv"):
        monkeypatch.setattr(sys, "prefix", prefix)
        assert launcher.main([str(tmp_path / "blank")]) == 2
        assert not (tmp_path / "blank").exists()


@pytest.mark.parametrize("rows", [
    [], [{"offset": 0, "length": 65536}, {"offset": 1 << 40, "length": 1}],
    [{"a": "}, {"}, {"a": "x"}], [{"}, {": 1}, {"}, {": 2}], [{"a": True}], [1, 2], {"x": 1}])
def test_json_rows(rows: object, capsys: pytest.CaptureFixture[str]) -> None:
    """snapshot diff --json: integer records one a line by the C encoder; anything else
    as print_json writes it -- always the same JSON value."""
    from tools.output import print_json, print_json_rows
    print_json_rows(rows)
    out = capsys.readouterr().out
    assert json.loads(out) == rows
    fast = isinstance(rows, list) and bool(rows) and all(
        isinstance(r, dict) and all(type(v) is int for v in r.values())
        and "}, {" not in "".join(r) for r in rows)
    if fast:
        assert out.splitlines()[1:-1] == [
            "  " + json.dumps(r, separators=(", ", ": ")) + ("," if i < len(rows) - 1 else "")
            for i, r in enumerate(rows)]
    else:
        print_json(rows)
        assert out == capsys.readouterr().out
