"""contrib/: the example TOML config, the systemd unit and the bash completion, and the
config loader `serve --config` uses (provider/config.py through tools/serving.py). No daemon,
no kernel: `serve` is only run where it fails before mounting."""

from __future__ import annotations

import argparse
import configparser
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from provider.config import EXIT_CONFIG, ConfigError, load, load_file, validate
from tools.parser import build_parser
from tools.serving import _serve_settings

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
TOML = CONTRIB / "shadowplex.toml"
UNIT = CONTRIB / "shadowplex.service"
COMPLETION = CONTRIB / "shadowplex.bash-completion"


def serve_settings(*argv: str) -> tuple[str, str, str, bool, dict[str, object]]:
    """What `shadowplex serve ARGV` would run with: the very code path of cmd_serve."""
    return _serve_settings(build_parser().parse_args(["serve", *argv]))


# --------------------------------------------------------------------------- the TOML
def test_example_config_loads_through_serves_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHADOWPLEX_SOCKET", raising=False)
    raw = tomllib.loads(TOML.read_text())
    pool, mount, sock, allow_other, config = serve_settings("--config", str(TOML))
    assert (pool, mount, sock) == (raw["pool"], raw["mount"], raw["socket"])
    assert allow_other is False
    # every other key reaches the service config, checked and typed
    assert set(config) == set(raw) - {"pool", "mount", "socket", "allow_other"}
    assert config["default_kind"] == "differential" and config["socket_mode"] == 0o600
    assert config["hold_deadline"] == 10.0 and isinstance(config["freeze_timeout"], float)
    assert config["sqlite_databases"] == [] and config["fsfreeze"] is True
    # the example's values are the daemon's defaults: the file documents, not changes
    from provider.coordinator import DEFAULTS
    for k, v in DEFAULTS.items():
        assert config[k] == v, k


def test_flags_override_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHADOWPLEX_SOCKET", "/run/env.sock")
    conf = tmp_path / "etc" / "spx.toml"
    conf.parent.mkdir()
    conf.write_text('pool = "pool"\nmount = "/srv/m"\nallow_other = true\n'
                    'default_kind = "plex"\nhooks_dir = "hooks"\n'
                    'sqlite_databases = ["a.db"]\n')
    pool, mount, sock, allow_other, config = serve_settings("--config", str(conf))
    assert pool == str(tmp_path / "etc" / "pool")       # relative to the file, not the cwd
    assert mount == "/srv/m" and allow_other is True
    assert sock == "/run/env.sock"                      # no socket key: the environment
    assert config["hooks_dir"] == str(tmp_path / "etc" / "hooks")
    assert config["sqlite_databases"] == [str(tmp_path / "etc" / "a.db")]
    pool, mount, sock, allow_other, config = serve_settings(
        "--config", str(conf), "--pool", "/p", "--socket", "/s.sock", "--no-allow-other",
        "--default-kind", "differential", "--hooks-dir", "", "--sqlite-db", "/b.db")
    assert (pool, mount, sock, allow_other) == ("/p", "/srv/m", "/s.sock", False)
    assert config["default_kind"] == "differential" and config["hooks_dir"] is None
    assert config["sqlite_databases"] == ["/b.db"]      # the flags replace the list
    assert serve_settings("--config", str(TOML))[4]["poll_us"] == 50
    assert serve_settings("--config", str(TOML), "--poll-us", "0")[4]["poll_us"] == 0


BAD_CONFIGS = [
    ('pool = "p"\nmount = "m"\nfrobnicate = 1\n', "unknown key 'frobnicate'"),
    ('pool = "p"\n[service]\nhold_deadline = 5\n', "has no [sections]"),
    ('pool = 3\n', "pool must be a non-empty path string, not 3"),
    ('freeze_timeout = "60"\n', "freeze_timeout must be a positive number"),
    ('hold_deadline = true\n', "hold_deadline must be a positive number"),   # not 1 s
    ('hook_timeout = -1\n', "hook_timeout must be a positive number"),
    ('socket_mode = 0o1777\n', "socket_mode must be an integer mode"),
    ('default_kind = "full"\n', "default_kind must be"),
    ('fsfreeze = "yes"\n', "fsfreeze must be true or false"),
    ('sqlite_databases = "a.db"\n', "sqlite_databases must be a list"),
    ('poll_us = 5000\n', "poll_us must be microseconds, 0..1000"),
    ('pool = "p\n', "not valid TOML"),
]


@pytest.mark.parametrize(("text", "fragment"), BAD_CONFIGS)
def test_bad_config_is_one_line_exit_78(tmp_path: Path, text: str, fragment: str) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError, match=None) as ei:
        load_file(str(conf))
    assert fragment in str(ei.value) and "\n" not in str(ei.value)
    # and through the real command: exit 78 (EX_CONFIG: the unit does not restart it),
    # one line, nothing started or created
    res = subprocess.run([sys.executable, "-m", "tools.cli", "serve", "--config", str(conf),
                          "--pool", str(tmp_path / "p"), "--mount", str(tmp_path / "m")],
                         cwd=str(ROOT), capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == EXIT_CONFIG, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith(f"shadowplex: error: {conf}: ")
    assert fragment in res.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.toml"]


def test_json_config_takes_the_same_keys() -> None:
    # provider.service --config: a JSON object (null turns the hook writers off)
    assert load('{"hooks_dir": null, "fsfreeze": false}') == {"hooks_dir": None,
                                                              "fsfreeze": False}
    with pytest.raises(ConfigError, match="unknown key 'hook_dir'"):
        load('{"hook_dir": "/x"}')
    with pytest.raises(ConfigError, match="expected a table"):
        validate([1, 2], "--config")      # type: ignore[arg-type]
    res = subprocess.run([sys.executable, "-m", "provider.service", "--config",
                          '{"freeze_timeout": "soon"}'], cwd=str(ROOT), capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 2 and "freeze_timeout must be" in res.stderr
    assert "Traceback" not in res.stderr


# --------------------------------------------------------------------------- the unit
def test_systemd_unit_runs_serve_with_the_config() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str   # type: ignore[assignment,method-assign]  # keys are CamelCase
    unit.read_string(UNIT.read_text())
    svc = unit["Service"]
    assert svc["Type"] == "notify"   # serve sends READY=1 (tests/test_daemon_service.py)
    # a configuration error (EXIT_CONFIG) or argv mistake (2) is not restarted
    assert svc["Restart"] == "on-failure"
    assert {"2", str(EXIT_CONFIG)} <= set(svc["RestartPreventExitStatus"].split())
    argv = shlex.split(svc["ExecStart"])
    assert os.path.basename(argv[0]) == "shadowplex" and argv[1] == "serve"
    args = build_parser().parse_args(argv[1:])           # a valid command line
    assert args.command == "serve" and args.config == "/etc/shadowplex/shadowplex.toml"
    assert args.config in TOML.read_text().splitlines()[0]   # the example says where it goes
    # the default socket's directory, which the config's `socket` uses
    assert svc["RuntimeDirectory"] == "shadowplex"
    assert tomllib.loads(TOML.read_text())["socket"].startswith("/run/shadowplex/")
    assert unit["Install"]["WantedBy"] == "multi-user.target"


# --------------------------------------------------------------------------- completion
def _command_paths(p: argparse.ArgumentParser, path: tuple[str, ...] = ()
                   ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    out = []
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                out.append(((*path, name), sub))
                out += _command_paths(sub, (*path, name))
    return out


def _bash_array(text: str, name: str) -> dict[str, str]:
    """The entries of `local -A NAME=( [key]=value ... )` in the completion file."""
    lines = text.splitlines()
    start = lines.index(f"    local -A {name}=(")
    out = {}
    for line in lines[start + 1:]:
        if line.strip() == ")":
            return out
        key, _, value = line.strip().partition("=")
        out[shlex.split(key[1:-1])[0]] = " ".join(shlex.split(value))
    raise AssertionError(f"array {name} not closed")


def test_completion_names_every_command() -> None:
    text = COMPLETION.read_text()
    subs, opts = _bash_array(text, "subs"), _bash_array(text, "opts")
    parser = build_parser()
    paths = _command_paths(parser)
    top = [p[0] for p, _ in paths if len(p) == 1]
    assert "serve" in top and "snapshot" in top and len(top) >= 15
    assert subs["shadowplex"].split() == top
    for path, sub in paths:
        key = " ".join(("shadowplex", *path))
        assert key in opts, f"{key} missing: run python -m tools.completion"
        children = [q[-1] for q, _ in paths if q[:-1] == path]
        if children:
            assert subs[key].split() == children, key
        if path[0] == "bench":
            continue   # bench's options belong to tools/bench.py, which changes on its own
        for o in (o for a in sub._actions for o in a.option_strings):
            assert o in opts[key].split(), (f"{key} {o} missing: run python -m "
                                            "tools.completion > " + str(COMPLETION))


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
@pytest.mark.parametrize(("words", "expected"), [
    (["sn"], ["snapshot"]),
    (["snapshot", ""], ["create", "list", "show", "diff", "delete"]),
    (["--socket", "/x", "snapshot", "create", "v", "--con"], ["--context"]),
    (["snapshot", "create", "--context", ""],
     ["backup", "file-share-backup", "nas-rollback", "app-rollback"]),
    (["serve", "--default-kind", "p"], ["plex"]),
    (["volume", "create", "v", ""], []),            # a size: nothing to offer
    (["serve", "--config", "CONTRIB/shadowplex.t"], ["CONTRIB/shadowplex.toml"]),
])
def test_completion_in_bash(words: list[str], expected: list[str]) -> None:
    words = [w.replace("CONTRIB", str(CONTRIB)) for w in words]
    expected = [w.replace("CONTRIB", str(CONTRIB)) for w in expected]
    script = (f"source {shlex.quote(str(COMPLETION))}\n"
              f"COMP_WORDS=(shadowplex {' '.join(shlex.quote(w) for w in words)})\n"
              "COMP_CWORD=$((${#COMP_WORDS[@]} - 1))\n"
              "_shadowplex\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    res = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True,
                         text=True, timeout=30, check=False)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert [x for x in res.stdout.splitlines() if x] == expected
