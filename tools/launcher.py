"""The installed `shadowplex` command: Python started without `site`.

`make install` writes BINDIR/shadowplex with this (it used to link the venv's console
script there):

    PREFIX/bin/python -m tools.launcher BINDIR/shadowplex

The file starts ``#!PREFIX/bin/python -IS``: -S skips the site module, which at every
start-up reads the venv's configuration and its .pth files and imports what they name
(docs/performance.md, "The CLI's start-up": the measured cost); -I ignores the PYTHON*
variables and the current directory, so the daemon (root, under systemd) imports only
from its venv. What site did that the command needs -- the venv's site-packages on
sys.path -- the file does itself, with the directories named here at install time. None
of shadowplex's dependencies needs a .pth file (the Ceph modules are symlinks in
site-packages: rbdarray/setup-ceph.sh). A child that runs sys.executable gets the
venv's Python with site, as before.

The limits: Linux reads at most SHEBANG_MAX bytes of a ``#!`` line, and splits it at the
first blank (the rest is one argument): a longer PREFIX, or one with a blank or any other
whitespace in it, is refused (one line, exit 2), nothing written.
"""

from __future__ import annotations

import os
import sys
import sysconfig

SHEBANG_MAX = 127   # bytes of a #! line every Linux reads (BINPRM_BUF_SIZE before 5.1)


def text(python: str, paths: list[str]) -> str:
    """The launcher: ``python`` without site, ``paths`` appended to sys.path."""
    return (f"#!{python} -IS\n"
            "# shadowplex, written by `make install` (tools/launcher.py): Python without\n"
            "# site (its start-up time); the venv's site-packages put on sys.path here\n"
            "import sys\n"
            f"sys.path += {paths!r}\n"
            "from tools.cli import run\n"
            "run()\n")


def site_dirs() -> list[str]:
    """This Python's (a venv's) site-packages: purelib, then platlib if another."""
    return list(dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib")))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tools.launcher OUT", file=sys.stderr)
        return 2
    out = argv[0]
    # the venv's own python (a symlink: not resolved, or the venv would be lost)
    python = os.path.join(sys.prefix, "bin", "python")
    line = f"#!{python} -IS"
    if any(c.isspace() for c in python):
        print(f"launcher: {python!r} has whitespace in it, which a #! line cannot hold: "
              "install with a PREFIX without blanks", file=sys.stderr)
        return 2
    if len(line.encode()) > SHEBANG_MAX:
        print(f"launcher: {python} is too long a path for a #! line ({len(line)} > "
              f"{SHEBANG_MAX} bytes): install with a shorter PREFIX", file=sys.stderr)
        return 2
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text(python, site_dirs()))
        os.fchmod(f.fileno(), 0o755)
    os.replace(tmp, out)   # over the old symlink or launcher, never through it
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
