#!/usr/bin/env bash
# Build pyfuse3 3.5.0 from its PyPI sdist with our patches (PATCHES below, applied in that
# order) and install it into a virtualenv (`make venv` runs this before `pip install -e .`).
#
#   build-pyfuse3.sh VENV_PYTHON BUILD_DIR    build + install (skipped if already there)
#   build-pyfuse3.sh --check VENV_PYTHON      only verify; exit 1 if not installed
#
# Why (each patch's header says more):
#   pyfuse3-3.5.0-fallocate.patch: pyfuse3 3.5.0 registers no fallocate handler with
#     libfuse, so the kernel fails every fallocate(2) on the mount with EOPNOTSUPP (no
#     punch-hole, no discard through a loop device, no fstrim).
#   pyfuse3-3.5.0-always-reply.patch: a request whose handling raises anything but
#     FUSEError (a MemoryError copying a write's data out of the splice pipe...) was never
#     answered, and the session loop ended: its writer waited in the kernel. Now answered
#     (ENOMEM/EIO).
#
# The installed version is 3.5.0+shadowplex.<12 hex digits of sha256(patches + build pins)>:
# it satisfies `pyfuse3==3.5.0` in pyproject.toml (a local label is ignored by ==), so
# `pip install -e .` keeps it, and a changed patch is a different version (rebuilt).
# Idempotent: the sdist is unpacked afresh into BUILD_DIR every time the build runs, and
# nothing is done when the wanted version is installed and verified.
#
# Every failure is fatal (set -e): there is no fallback to an unpatched pyfuse3.
# Needs: gcc, pkg-config, libfuse3-dev, python3-dev, patch (APT_PACKAGES in the Makefile),
# and PyPI for the sdist and the build dependencies (pinned in
# pyfuse3-build-constraints.txt; Cython regenerates the C file from the patched .pyx).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PATCHES=("$HERE/pyfuse3-3.5.0-fallocate.patch" "$HERE/pyfuse3-3.5.0-always-reply.patch")
CONSTRAINTS="$HERE/pyfuse3-build-constraints.txt"
VERSION=3.5.0
SDIST_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
# the local label names the patches and the build pins: change any and it is rebuilt
WANT="$VERSION+shadowplex.$(cat "${PATCHES[@]}" "$CONSTRAINTS" | sha256sum | cut -c1-12)"

say() { echo "pyfuse3: $*"; }
die() { echo "pyfuse3: ERROR: $*" >&2; exit 1; }

# Is the patched build installed? Checks the distribution's version and that the compiled
# module carries both patches: the fallocate handler and reply_exception (Cython function
# names, so the strings are in the .so only when the patched .pyx was compiled).
installed() {
    "$1" - "$WANT" <<'EOF'
import importlib.metadata as md, sys
want = sys.argv[1]
try:
    have = md.version("pyfuse3")
except md.PackageNotFoundError:
    sys.exit("pyfuse3 is not installed")
if have != want:
    sys.exit(f"pyfuse3 {have} is installed, want {want}")
import pyfuse3
if "fallocate" not in vars(pyfuse3.Operations):
    sys.exit("pyfuse3.Operations has no fallocate")
with open(pyfuse3.__file__, "rb") as f:
    so = f.read()
for name, what in ((b"fuse_fallocate_async", "fallocate handler"),
                   (b"reply_exception", "answer to every request (always-reply patch)")):
    if name not in so:
        sys.exit(f"{pyfuse3.__file__} has no {what} compiled in")
EOF
}

if [ "${1:-}" = "--check" ]; then
    [ $# -eq 2 ] || die "usage: $0 --check VENV_PYTHON"
    why="$(installed "$2" 2>&1)" || die "the patched pyfuse3 is not installed in $2: $why (run: make venv)"
    say "$WANT installed"
    exit 0
fi

[ $# -eq 2 ] || die "usage: $0 VENV_PYTHON BUILD_DIR"
VPY="$1"
BUILD="$(mkdir -p "$2" && cd "$2" && pwd)"

if installed "$VPY" >/dev/null 2>&1; then
    say "$WANT already installed"
    exit 0
fi

for tool in gcc pkg-config patch; do
    command -v "$tool" >/dev/null || die "$tool not found (make setup-system installs it)"
done
pkg-config --exists fuse3 || die "libfuse3-dev (pkg-config fuse3) is missing (make setup-system)"

start=$SECONDS
rm -rf "$BUILD/src" "$BUILD/dist" "$BUILD/wheel"
mkdir -p "$BUILD/dist" "$BUILD/src" "$BUILD/wheel"
# The pinned sdist, verified by hash. --no-binary for pyfuse3 only: its build
# dependencies (Cython, setuptools) are needed to prepare its metadata and come as wheels
# (--no-binary :all: would compile Cython from source for that: minutes).
echo "pyfuse3==$VERSION --hash=sha256:$SDIST_SHA256" >"$BUILD/requirements.txt"
say "downloading the pyfuse3 $VERSION sdist"
"$VPY" -m pip download -q --no-deps --no-binary pyfuse3 --require-hashes \
    --build-constraint "$CONSTRAINTS" -r "$BUILD/requirements.txt" -d "$BUILD/dist"
tar -xzf "$BUILD/dist/pyfuse3-$VERSION.tar.gz" -C "$BUILD/src"
SRC="$BUILD/src/pyfuse3-$VERSION"
for p in "${PATCHES[@]}"; do
    say "applying $(basename "$p")"
    patch -d "$SRC" -p1 --forward --batch --quiet <"$p" || die "$(basename "$p") does not apply"
done
# The sdist ships a pre-generated __init__.c of the UNPATCHED sources; remove it so the
# build cannot fall back to it: Cython must compile the patched .pyx (or the build fails).
rm -f "$SRC/src/pyfuse3/__init__.c"
say "building the wheel (Cython + gcc)"
SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3="$WANT" \
    "$VPY" -m pip wheel -q --no-deps --build-constraint "$CONSTRAINTS" -w "$BUILD/wheel" "$SRC"
wheel=("$BUILD"/wheel/pyfuse3-*.whl)
[ -f "${wheel[0]}" ] || die "no wheel was built"
# this wheel replaces whatever pyfuse3 is there; then its dependencies (trio) if missing
"$VPY" -m pip install -q --no-deps --force-reinstall "${wheel[0]}"
"$VPY" -m pip install -q "${wheel[0]}"
why="$(installed "$VPY" 2>&1)" || die "installed, but the check fails: $why"
say "$WANT installed in $((SECONDS - start)) s"
