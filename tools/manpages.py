"""Man pages for `shadowplex`, generated from tools/parser.py's build_parser with
argparse-manpage (its Manpage class: the roff of a parser's usage, options and help):

    python -m tools.manpages contrib/man

shadowplex(1) holds the global options, the list of commands, the exit status, the
environment and the files; shadowplex-COMMAND(1), one page per command as git has them,
holds the command's usage, its actions and every option with its help (the global
options are named once, in shadowplex(1)); shadowplex-script(1) also lists the
script verbs (tools/script's VERB_TABLE).

The pages are committed under contrib/man/ like the bash completion, so that `make
install` copies files and needs no generator; tests/test_manpages.py fails when they
differ from what the parser generates: regenerate after changing the parser. A page's
date is the day its text last changed: regenerating rewrites only the pages whose text
changed (and removes the pages of commands that are gone).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from collections.abc import Callable

from argparse_manpage.manpage import Manpage

from .output import PROG, package_version
from .parser import walk

SECTION = "1"
MANUAL = "shadowplex manual"
# Help text is not wrapped in the roff source (man fills the lines itself): a wrapped
# line that began with "." or "'" would be read as a roff request and vanish.
_NO_WRAP = 100_000
# the roff requests the pages may use (a line starting with anything else is text)
_REQUESTS = {".TH", ".SH", ".SS", ".TP", ".B", ".IP", ".PP", ".RS", ".RE", ".nf", ".fi",
             ".UR", ".UE", ".br"}
_TH = re.compile(r'^\.TH \S+ "\d+" "([^"]*)"', re.M)

EXIT_STATUS = [
    ("0", "success"),
    ("1", "the operation failed (one line on stderr says why)"),
    ("2", "usage error: a wrong command line or argument; nothing was done"),
    ("78", "serve: a configuration error (EX_CONFIG; the systemd unit does not restart "
     "it)"),
    ("130", "interrupted (Ctrl-C): what the daemon did with the request is said on stderr"),
]
ENVIRONMENT = [
    ("SHADOWPLEX_SOCKET", "the control socket when --socket is not given"),
]
FILES = [
    ("/etc/shadowplex/shadowplex.toml", "serve --config's settings (the systemd unit's)"),
    ("/run/shadowplex/shadowplex.sock", "the daemon's control socket (default)"),
    ("MOUNT/volumes/NAME.img", "a volume, read-write"),
    ("MOUNT/exposed/NAME.img", "an exposed snapshot, read-only"),
    ("MOUNT/.shadow/ID.img", "every snapshot's device path: read-only, not listed"),
]
DOCS = ("the project's docs/ (provider.md: the daemon and the CLI; scripts.md: the "
        "script language; backup.md, hosts.md, network.md, ceph.md, format.md) and README.md")


def _esc(text: str) -> str:
    """Text for a roff line: backslashes and hyphens escaped, never a request."""
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def _tp(term: str, text: str) -> str:
    return f".TP\n{term}\n{_esc(text)}"


def _bold(text: str) -> str:
    return f"\\fB{_esc(text)}\\fR"


def _subparsers(p: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a
    return None


def _prepare(top: argparse.ArgumentParser) -> None:
    """Make a freshly built parser print as a page: no wrapping, the global options only
    on shadowplex(1), the commands' group titled."""
    global_dests = {a.dest for a in top._actions if a.option_strings}
    for _, p in walk(top):
        p.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=_NO_WRAP)
        p.epilog = None   # script's verb list: its own VERBS section
        if p is not top:
            for a in p._actions:
                if a.option_strings and a.dest in global_dests and "--help" not in \
                        a.option_strings:
                    a.help = argparse.SUPPRESS
        sp = _subparsers(p)
        if sp is None:
            continue
        for ca in sp._choices_actions:
            sub = sp.choices[ca.dest]
            if sub.description == ca.help:   # said once, as the action's summary
                sub.description = None
        for g in p._action_groups:
            if sp in g._group_actions:
                g.title = "commands" if p is top else "actions"


def _page(parser: argparse.ArgumentParser, name: str, description: str, date: str,
          sections: list[tuple[str, str]]) -> str:
    for g in parser._action_groups:   # argparse-manpage drops this title on a page's top
        if g.title == "positional arguments":
            g.title = "arguments"
    mp = Manpage(parser, {"project_name": PROG, "version": package_version(),
                          "manual_title": MANUAL, "manual_section": SECTION,
                          "date": date, "description": description},
                 format="single-commands-section")
    mp.prog = name   # the page's title and NAME: shadowplex-snapshot, not "shadowplex snapshot"
    for heading, content in sections:
        mp.add_section(heading, ">", content)
    return str(mp)


def _global_sections(top: argparse.ArgumentParser) -> list[tuple[str, str]]:
    sp = _subparsers(top)
    assert sp is not None
    commands = "\n".join(_tp(f"{_bold(f'{PROG}-{a.dest}')}({SECTION})", str(a.help))
                         for a in sp._choices_actions)
    return [
        ("commands", f"Each command has its page; '{_esc(PROG)} COMMAND \\-\\-help' says "
                     "the same.\n" + commands),
        ("exit status", "\n".join(_tp(_bold(c), t) for c, t in EXIT_STATUS)),
        ("environment", "\n".join(_tp(_bold(v), t) for v, t in ENVIRONMENT)),
        ("files", "\n".join(_tp(_bold(f), t) for f, t in FILES)),
        ("see also", _esc(DOCS)),
    ]


def _command_sections(name: str) -> list[tuple[str, str]]:
    out = []
    if name == "script":
        from .script_verbs import VERB_TABLE
        out.append(("verbs", "One per line, case\\-insensitive; # starts a comment.\n"
                    + "\n".join(_tp(_bold(syntax), what)
                                for syntax, what in VERB_TABLE.values())))
    out.append(("global options", f"\\-\\-socket, \\-\\-host, \\-\\-array, \\-\\-tls\\-dir, "
                f"\\-\\-json, \\-q/\\-\\-quiet and \\-\\-debug are accepted after the command "
                f"too: see {_bold(PROG)}({SECTION})."))
    out.append(("see also", f"{_bold(PROG)}({SECTION}); " + _esc(DOCS)))
    return out


def render(dates: Callable[[str], str]) -> dict[str, str]:
    """Every page: file name -> roff text; ``dates(file name)`` gives its date."""
    from .parser import build_parser
    top = build_parser()
    sp = _subparsers(top)
    assert sp is not None
    helps = {a.dest: str(a.help) for a in sp._choices_actions}
    _prepare(top)
    pages = {}
    for name, sub in sp.choices.items():
        fname = f"{PROG}-{name}.{SECTION}"
        pages[fname] = _page(sub, f"{PROG}-{name}", helps[name], dates(fname),
                             _command_sections(name))
    usage = top.format_usage().split(":", 1)[1].split(None, 1)[1]
    sp.help = argparse.SUPPRESS   # the commands: their own section, one line each
    fname = f"{PROG}.{SECTION}"
    sections = [("synopsis", f".B {PROG}\n{_esc(' '.join(usage.split()))}"),
                *_global_sections(top)]
    pages[fname] = _page(top, PROG, str(top.description).rstrip("."), dates(fname),
                         sections)
    return {fname: _checked(fname, text) for fname, text in pages.items()}


def _checked(fname: str, text: str) -> str:
    """No text line that roff would read as a request; a break point after every comma
    of the text (`-o`'s list of fields is one long word otherwise: "can't break line")."""
    out = []
    for line in text.splitlines():
        if line.startswith("'") or (line.startswith(".")
                                    and line.split(None, 1)[0] not in _REQUESTS):
            raise ValueError(f"{fname}: a text line reads as a roff request: {line!r}")
        out.append(line if line.startswith(".") else line.replace(",", ",\\:"))
    return "\n".join(out) + "\n"


def page_date(text: str) -> str | None:
    """The date in a page's .TH line."""
    m = _TH.search(text)
    return m.group(1).replace("\\-", "-") if m else None


def write(directory: str) -> list[str]:
    """Regenerate the pages in ``directory``; the names of the files written or removed."""
    os.makedirs(directory, exist_ok=True)
    old = {}
    for f in os.listdir(directory):
        if f.startswith(PROG) and f.endswith(f".{SECTION}"):
            with open(os.path.join(directory, f)) as fh:
                old[f] = fh.read()
    today = datetime.date.today().isoformat()
    kept = render(lambda f: page_date(old.get(f, "")) or today)
    fresh = render(lambda f: today)
    changed = []
    for f, text in kept.items():
        if old.get(f) != text:
            with open(os.path.join(directory, f), "w") as fh:
                fh.write(fresh[f])
            changed.append(f)
    for f in sorted(set(old) - set(kept)):
        os.unlink(os.path.join(directory, f))
        changed.append(f)
    return changed


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tools.manpages DIR (the pages: contrib/man)", file=sys.stderr)
        return 2
    for f in write(argv[0]):
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
