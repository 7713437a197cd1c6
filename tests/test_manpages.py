"""Docs in the terminal (issue 19 #7): help on every option, the man pages generated from
the parser (tools/manpages.py -> contrib/man/), rendered by man(1), installed by make,
and `shadowplex script --help` listing the script verbs. No daemon: the parser, man,
make and the CLI's --help only."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ENV, ROOT

from tools import manpages
from tools.parser import build_parser, walk
from tools.script import VERB_TABLE, parse_script

MAN_DIR = ROOT / "contrib" / "man"
# options hidden from --help on purpose: (command path, option)
HIDDEN = {(("bench",), "--tiny")}   # tiny sizes for the CI test of the bench


def _documented(p: argparse.ArgumentParser, path: tuple[str, ...]
                ) -> Iterator[argparse.Action]:
    for a in p._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        if a.option_strings and (path, a.option_strings[-1]) in HIDDEN:
            continue
        yield a


def test_every_option_and_argument_has_help() -> None:
    """Walks the whole parser: every option, positional, command and action has a help
    text (a new option without one fails here)."""
    missing = []
    commands = 0
    for path, p in walk(build_parser()):
        for a in _documented(p, path):
            what = f"{' '.join(('shadowplex', *path))} {'/'.join(a.option_strings) or a.dest}"
            if not isinstance(a.help, str) or not a.help.strip() or a.help == argparse.SUPPRESS:
                missing.append(what)
            if isinstance(a, argparse._SubParsersAction):
                for ca in a._choices_actions:
                    commands += 1
                    if not isinstance(ca.help, str) or not ca.help.strip():
                        missing.append(f"{what} {ca.dest}")
    assert missing == []
    assert commands >= 35   # the walk reached every level (22 commands + their actions)


# --------------------------------------------------------------------------- the pages
def test_committed_pages_are_what_the_parser_generates() -> None:
    """contrib/man/ is generated: the same text (with each page's own date), and a page
    for every command, none for a command that is gone."""
    files = {f.name: f.read_text() for f in MAN_DIR.glob("*.1")}
    fresh = manpages.render(lambda f: manpages.page_date(files.get(f, "")) or "2000-01-01")
    hint = "regenerate: python -m tools.manpages contrib/man"
    assert sorted(files) == sorted(fresh), hint
    top = [name for path, _ in walk(build_parser()) if len(path) == 1 for name in path]
    assert sorted(fresh) == sorted(["shadowplex.1", *(f"shadowplex-{c}.1" for c in top)])
    for name, text in fresh.items():
        assert files[name] == text, f"{name} differs: {hint}"


def test_regenerating_keeps_the_date_of_unchanged_pages(tmp_path: Path) -> None:
    for f in MAN_DIR.glob("*.1"):
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "shadowplex-gone.1").write_text(".TH X\n")
    text = (tmp_path / "shadowplex-df.1").read_text()
    (tmp_path / "shadowplex-df.1").write_text(text.replace("space", "room", 1))
    assert manpages.write(str(tmp_path)) == ["shadowplex-df.1", "shadowplex-gone.1"]
    assert not (tmp_path / "shadowplex-gone.1").exists()
    assert (tmp_path / "shadowplex-df.1").read_text().count("space") == text.count("space")
    assert manpages.write(str(tmp_path)) == []


def _render(page: Path) -> str:
    """The page as man shows it: plain ASCII text, 80 columns, no hyphenation."""
    if shutil.which("man") is None:
        pytest.skip("man is not installed (make setup-system installs man-db)")
    env = dict(os.environ, LC_ALL="C", MANWIDTH="80")
    env.pop("MAN_KEEP_FORMATTING", None)
    res = subprocess.run(["man", "--nh", "--nj", "-l", str(page)], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0 and res.stderr == "", (page.name, res.stderr)
    return res.stdout


def _squeezed(text: str) -> str:
    """Without whitespace: how man broke the lines does not matter."""
    return re.sub(r"\s+", "", text)


PAGES = sorted(p.name for p in MAN_DIR.glob("*.1"))


@pytest.mark.parametrize("name", PAGES)
def test_man_renders_each_page_with_every_option_and_its_help(name: str) -> None:
    text = _render(MAN_DIR / name)
    flat = _squeezed(text)
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if name == "shadowplex.1":
        assert text.startswith("SHADOWPLEX(1)")
        # the global options, and every command with its page and its one line
        for a in _documented(parser, ()):
            if a is not sub:
                assert all(o in text for o in a.option_strings), a.option_strings
                assert _squeezed(str(a.help)) in flat, a.help
        for ca in sub._choices_actions:
            assert _squeezed(f"shadowplex-{ca.dest}(1) {ca.help}") in flat, ca.dest
        assert "EXIT STATUS" in text and "SHADOWPLEX_SOCKET" in text
        return
    command = name[len("shadowplex-"):-len(".1")]
    assert text.startswith(f"SHADOWPLEX-{command.upper()}(1)")
    globals_ = {a.dest for a in parser._actions if a.option_strings}
    for path, p in walk(sub.choices[command], (command,)):
        if len(path) > 1:   # an action of the command: its own heading
            assert re.search(rf"^\s+shadowplex {' '.join(path)}$", text, re.M), path
        for a in _documented(p, path):
            if a.dest in globals_ or isinstance(a, argparse._SubParsersAction):
                continue
            shown = a.option_strings or [str(a.metavar or a.dest)]
            assert all(o in text for o in shown), (path, shown)
            assert _squeezed(str(a.help)) in flat, (path, a.help)
    assert "shadowplex(1)" in text   # the global options are there
    if command == "script":
        for syntax, what in VERB_TABLE.values():
            assert _squeezed(f"{syntax} {what}") in flat, syntax


def test_make_installs_and_removes_the_pages(tmp_path: Path) -> None:
    """`make install` puts every page where man finds it (install-man, its part that
    needs no root), `make uninstall` removes them, nothing else."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    mandir = tmp_path / "man"
    (mandir / "man1").mkdir(parents=True)
    (mandir / "man1" / "other.1").write_text(".TH OTHER 1\n")
    run = lambda *a: subprocess.run(["make", "-s", "-C", str(ROOT), *a, f"MANDIR={mandir}"],
                                    capture_output=True, text=True, timeout=60, check=True)
    run("install-man")
    assert sorted(os.listdir(mandir / "man1")) == sorted([*PAGES, "other.1"])
    for f in PAGES:
        assert (mandir / "man1" / f).read_bytes() == (MAN_DIR / f).read_bytes()
        assert (mandir / "man1" / f).stat().st_mode & 0o777 == 0o644
    if shutil.which("man"):
        where = subprocess.run(["man", "-M", str(mandir), "-w", "shadowplex-snapshot"],
                               capture_output=True, text=True, timeout=60, check=False)
        assert where.stdout.strip() == str(mandir / "man1" / "shadowplex-snapshot.1")
    run("uninstall-man")
    assert os.listdir(mandir / "man1") == ["other.1"]


# --------------------------------------------------------------------------- script --help
def test_script_help_lists_every_verb_on_one_line() -> None:
    res = subprocess.run([sys.executable, "-m", "tools.cli", "script", "--help"],
                         cwd=str(ROOT), capture_output=True, text=True, timeout=60,
                         check=True, env=dict(ENV, COLUMNS="100"))
    lines = res.stdout.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("verbs ("))
    assert "docs/scripts.md" in lines[start]
    verbs = lines[start + 1:]
    assert len(verbs) == len(VERB_TABLE)
    for line, (syntax, what) in zip(verbs, VERB_TABLE.values()):
        assert re.fullmatch(rf"  {re.escape(syntax)} +{re.escape(what)}", line), line


# --------------------------------------------------------------------------- docs/scripts.md
SCRIPTS_MD = ROOT / "docs" / "scripts.md"


def test_scripts_doc_describes_every_verb_and_its_examples_parse() -> None:
    text = SCRIPTS_MD.read_text()
    rows = re.findall(r"^\| `([^`]+)` \|", text, re.M)
    for verb in VERB_TABLE:
        assert any(r.lower().startswith(verb) for r in rows), f"{verb} not in docs/scripts.md"
    examples = re.findall(r"```dsh\n(.*?)```", text, re.S)
    assert len(examples) >= 4
    for block in examples:
        parse_script(block)   # a ScriptError names the line
    readme = (ROOT / "README.md").read_text()
    assert "docs/scripts.md" in readme
