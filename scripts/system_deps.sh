#!/usr/bin/env bash
# What `make test` and `make demo` need from Debian 12, installed only when missing: each command or
# file below is checked first, so a machine with everything in place needs neither apt nor the network.
# Both targets run this first; .ci/run too. Run as root (the tests and the demo need root anyway).
# Usage: scripts/system_deps.sh [TARGET]   (TARGET names the make target in messages)
set -euo pipefail

what="${1:-test}"
if [ "$(id -u)" -ne 0 ]; then
    echo "make $what needs root: it mounts filesystems (FUSE, ext4 on loop devices, overlayfs), runs" >&2
    echo "containerd and runc, and installs missing Debian packages with apt-get. Run: sudo make $what" >&2
    exit 1
fi

# Root's tools live in /usr/sbin and /sbin, which a plain `su` or a chroot shell may leave off PATH.
export PATH="$PATH:/usr/sbin:/sbin"
missing=()

# PACKAGE COMMAND...: PACKAGE is missing unless every COMMAND is on PATH.
need_commands() {
    local package=$1 cmd
    shift
    for cmd in "$@"; do
        if ! command -v "$cmd" >/dev/null 2>&1; then
            missing+=("$package")
            return
        fi
    done
}

# PACKAGE PATH: PACKAGE is missing unless PATH exists.
need_file() {
    [ -e "$2" ] || missing+=("$1")
}

# PACKAGE: missing unless dpkg has it installed (a library with no command of its own).
need_package() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ] || missing+=("$1")
}

need_commands python3 python3
need_commands make make
# tests/e2e and the demo: a private containerd, runc, a loopback registry (htpasswd for its users)
need_commands containerd containerd ctr
need_commands runc runc
need_commands docker-registry docker-registry
need_commands apache2-utils htpasswd
need_commands skopeo skopeo
# images, devices and mounts (the tests and damselfly itself)
need_commands e2fsprogs mkfs.ext4 debugfs dumpe2fs e2fsck filefrag
need_commands mount mount umount losetup
need_commands util-linux findmnt setpriv prlimit fstrim
need_commands fuse3 fusermount3
# the multi-node P2P tests, the benchmark and the demo's second node: network namespaces, veth, tbf
need_commands iproute2 ip tc
need_commands util-linux nsenter
# scripts/build_debian_image.py (the demo's Debian image)
need_commands debootstrap debootstrap
# tests/programs.py (`gcc -static`: libc.a) and tests/snapshotter/test_fuseabi.py (<linux/fuse.h>)
need_commands gcc gcc
need_package libc6-dev
need_file linux-libc-dev /usr/include/linux/fuse.h
# tests/conformance: containerd's snapshotter suite, built from Debian's Go source of containerd
need_commands golang-go go
need_file golang-github-containerd-containerd-dev /usr/share/gocode/src/github.com/containerd/containerd
# the test and demo images' /bin/busybox: it must be static (the images have no libc)
if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then
    missing+=(busybox-static)
fi
# `make install` makes a venv: Debian splits venv (and ensurepip) out of python3, and Python.h
# (for a dependency without a wheel) into python3-dev.
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi
if ! python3 -c 'import os, sysconfig; raise SystemExit(not os.path.exists(sysconfig.get_path("include") + "/Python.h"))' \
    >/dev/null 2>&1; then
    missing+=(python3-dev)
fi

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "make $what: installing ${packages[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# One unreachable third-party source makes `apt-get update` fail; the install below says if it matters.
apt-get update -qq || echo "make $what: apt-get update failed; trying the install anyway" >&2
if ! apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null; then
    echo "make $what: could not install ${packages[*]} with apt-get (see above); install them and retry" >&2
    exit 1
fi
