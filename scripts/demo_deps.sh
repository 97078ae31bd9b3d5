#!/usr/bin/env bash
# What `make demo` needs from Debian, installed only when a command is missing (so a machine with
# everything in place needs no network). Run as root.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "make demo needs root: it runs containerd and runc, mounts filesystems and attaches loop" >&2
    echo "devices, and installs what is missing with apt-get. Run: sudo make demo" >&2
    exit 1
fi

# command -> Debian package
declare -A NEEDS=(
    [containerd]=containerd
    [ctr]=containerd
    [runc]=runc
    [docker-registry]=docker-registry
    [mkfs.ext4]=e2fsprogs
    [debugfs]=e2fsprogs
    [debootstrap]=debootstrap
    [busybox]=busybox-static
    [fusermount3]=fuse3
    [skopeo]=skopeo
    [losetup]=mount
)
missing=()
for cmd in "${!NEEDS[@]}"; do
    if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1; then
        missing+=("${NEEDS[$cmd]}")
    fi
done
# `make install` makes a venv: Debian splits venv (and ensurepip) out of python3.
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "make demo: installing ${packages[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
