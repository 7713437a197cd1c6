#!/usr/bin/env bash
# Ceph for the RBD backend (rbdarray/, docs/ceph.md) and its tests (`make ceph`, which
# `make test` runs; `make setup` does not: the ~50 packages take ~13 s and ~250 MB).
#
#   setup-ceph.sh system              apt-get install ceph-mon ceph-osd python3-rados
#                                     python3-rbd rbd-fuse (only those missing;
#                                     --no-install-recommends; rbd-fuse: the comparator
#                                     of `python -m tools.bench.rbd`)
#   setup-ceph.sh link VENV_PYTHON    symlink the Debian rados/rbd extension modules into
#                                     the venv's site-packages and import them once
#
# There is nothing usable on PyPI for librados/librbd: the Debian modules (python3-rados,
# python3-rbd) are built for Debian's Python 3.11, and a 3.11 venv imports them through a
# symlink (also a non-Debian 3.11). Only the two extension modules are linked, never the
# whole dist-packages directory.
#
# Without Ceph (not root and no sudo, no such packages, a venv that is not 3.11) this
# says why and exits 0: the RBD tests then skip with that reason -- unless
# SHADOWPLEX_REQUIRE_KERNEL=1 (CI), where a missing Ceph fails here, as a missing kernel
# prerequisite fails the kernel tests.
set -euo pipefail

PACKAGES=(ceph-mon ceph-osd python3-rados python3-rbd rbd-fuse)
MODULES=(rados rbd)
DIST=/usr/lib/python3/dist-packages

say() { echo "ceph: $*"; }
# a prerequisite is missing: fatal on CI, a note elsewhere
missing() {
    case "${SHADOWPLEX_REQUIRE_KERNEL:-}" in
        1|true|yes|on) echo "ceph: ERROR: $* (SHADOWPLEX_REQUIRE_KERNEL=1, so this is a failure)" >&2
                       exit 1 ;;
    esac
    echo "ceph: skipped: $*; the Ceph RBD tests will be skipped" >&2
    exit 0
}

system() {
    local p todo=()
    for p in "${PACKAGES[@]}"; do
        dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || todo+=("$p")
    done
    [ ${#todo[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || missing "no apt-get to install ${todo[*]}"
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"
        else missing "need root (or sudo) to install ${todo[*]}"; fi
    fi
    say "installing: ${todo[*]}"
    # the package lists may be old or absent on a fresh machine: update only if the
    # packages are not known yet
    if ! apt-cache show "${todo[@]}" >/dev/null 2>&1; then
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q || true
    fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${todo[@]}" || missing "apt-get could not install ${todo[*]}"
}

link() {
    local vpy="$1" site suffix m src
    [ -x "$vpy" ] || missing "no venv python at $vpy"
    site="$("$vpy" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
    suffix="$("$vpy" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
    for m in "${MODULES[@]}"; do
        src="$DIST/$m$suffix"
        [ -e "$src" ] || missing "$src is missing (the python3-$m package is built for \
Debian's Python; the venv's $("$vpy" -V 2>&1) needs a module named $m$suffix)"
        if [ "$(readlink "$site/$m$suffix" 2>/dev/null)" != "$src" ]; then
            ln -sfn "$src" "$site/$m$suffix"
            say "linked $site/$m$suffix -> $src"
        fi
    done
    "$vpy" -c 'import rados, rbd' || missing "the venv cannot import rados and rbd"
}

case "${1:-}" in
    system) system ;;
    link)   [ $# -eq 2 ] || { echo "usage: $0 link VENV_PYTHON" >&2; exit 2; }
            link "$2" ;;
    *)      echo "usage: $0 system | link VENV_PYTHON" >&2; exit 2 ;;
esac
