#!/usr/bin/env bash
# Build the Damselfly image on this machine, without a container daemon, from the Containerfile.
#
#   scripts/build-image.sh [--tag NAME:TAG] [--push DESTINATION] [--oci-archive FILE]
#
# The Containerfile is the documented way to build with docker or podman; here no public
# registry is reachable and there is no daemon, so:
#   1. the base is a minimal Debian bookworm made by debootstrap (python3, python3-venv,
#      ca-certificates), with docs, man pages, locales and apt lists removed, imported as the image
#      localhost/damselfly-base:<key>. <key> is a hash of the suite, the package list and this
#      recipe, and the rootfs tarball is kept in .cache/image/, so only the first build pays for
#      debootstrap (about 45 s);
#   2. `buildah bud` builds the Containerfile with BASE set to that image: the project's wheel is
#      built and installed with its dependencies from PyPI (pip's cache is a build cache mount).
# buildah keeps its images in .cache/image/storage (vfs driver: no overlay mounts needed), not
# in the system's container storage. Needs root (debootstrap, buildah's chroot).
#
# --push DESTINATION: e.g. docker://127.0.0.1:5000/damselfly/damselfly:0.1.0 (plain HTTP is
# allowed for 127.0.0.1 and localhost destinations). --oci-archive FILE: also write the image as
# an OCI archive (skopeo copy oci-archive:FILE docker://... pushes it anywhere later).
# Prints the image's size and digest last.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)
tag="localhost/damselfly:${version}"
push=""
archive=""
while (($#)); do
  case $1 in
    --tag) tag=$2; shift 2 ;;
    --push) push=$2; shift 2 ;;
    --oci-archive) archive=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-image.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

if [[ $(id -u) -ne 0 ]]; then
  echo "build-image.sh: needs root (debootstrap and buildah's chroot); run it with sudo" >&2
  exit 1
fi
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "build-image.sh: $tool is missing; scripts/setup.sh installs it" >&2; exit 1; }
done

cache=$PWD/.cache/image
mkdir -p "$cache"
buildah=(buildah --storage-driver vfs --root "$cache/storage" --runroot "$cache/run")

# --- 1. the base: debootstrap'd bookworm, cached by a key of what goes into it -----------------
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=python3,python3-venv,ca-certificates
arch=$(dpkg --print-architecture)
# What makes the rootfs slim; part of the key, so changing it rebuilds the base.
slim_paths=(usr/share/doc usr/share/man usr/share/info usr/share/locale usr/share/lintian
            var/cache/apt var/lib/apt/lists var/log)
key=$(printf '%s\n' "$suite" "$arch" "$packages" "${slim_paths[@]}" "recipe 1" | sha256sum | cut -c1-16)
base="localhost/damselfly-base:$key"
tarball="$cache/base-$key.tar"

if ! "${buildah[@]}" inspect --type image "$base" >/dev/null 2>&1; then
  if [[ ! -s $tarball ]]; then
    echo "build-image.sh: debootstrap $suite ($packages) from $mirror"
    rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
      || { tail -n 20 "$cache/debootstrap.log" >&2; echo "build-image.sh: debootstrap failed (log: $cache/debootstrap.log)" >&2; exit 1; }
    for path in "${slim_paths[@]}"; do
      find "$rootfs/$path" -mindepth 1 -delete 2>/dev/null || true
    done
    # Keep dpkg from writing docs back should anyone apt-get install in a derived image.
    mkdir -p "$rootfs/etc/dpkg/dpkg.cfg.d"
    printf 'path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\npath-exclude /usr/share/locale/*\n' \
      >"$rootfs/etc/dpkg/dpkg.cfg.d/damselfly-slim"
    # Device nodes and the kernel's filesystems come from the runtime, not the image.
    tar -C "$rootfs" --numeric-owner --exclude=./dev/* --exclude=./proc/* --exclude=./sys/* \
      -cf "$tarball.partial" .
    mv "$tarball.partial" "$tarball"
    rm -rf "$rootfs"
    trap - EXIT
  fi
  echo "build-image.sh: importing the base $base"
  container=$("${buildah[@]}" from scratch)
  "${buildah[@]}" add --quiet "$container" "$tarball" / >/dev/null
  "${buildah[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd /bin/bash --os linux --arch "$arch" "$container"
  "${buildah[@]}" commit --quiet --rm "$container" "$base" >/dev/null
fi

# --- 2. the image, from the Containerfile -------------------------------------------------------
# If this machine's pip trusts an extra CA (a TLS-intercepting proxy in front of PyPI), the
# build's pip trusts the same bundle: mounted read-only, named by PIP_CERT.
bud_extra=()
pip_ca=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
if [[ -n $pip_ca && -f $pip_ca ]]; then
  bud_extra+=(--volume "$pip_ca:/run/damselfly-build/pip-ca.crt:ro" --build-arg PIP_CERT=/run/damselfly-build/pip-ca.crt)
fi
started=$(date -u +%Y-%m-%dT%H:%M:%S)
echo "build-image.sh: buildah bud -f Containerfile --build-arg BASE=$base -t $tag"
"${buildah[@]}" bud --quiet --layers --isolation chroot --pull=false --format oci \
  --build-arg "BASE=$base" "${bud_extra[@]}" -f Containerfile -t "$tag" . >/dev/null

# vfs keeps a full copy of the root filesystem per layer: drop the untagged images (earlier
# builds' layers) older than this build, so .cache/image stays about one image's size. What this
# build reused stays in use; what it did not is rebuilt next time (seconds: the steps before the
# sources are COPYed).
"${buildah[@]}" images --all --json | python3 -c '
import json, sys
for image in json.load(sys.stdin):
    if not image.get("names") and image["createdatraw"][:19] < sys.argv[1]:
        print(image["id"])' "$started" | xargs -r "${buildah[@]}" rmi >/dev/null 2>&1 || true

if [[ -n $archive ]]; then
  rm -f "$archive"
  "${buildah[@]}" push --quiet "$tag" "oci-archive:$archive"
  echo "build-image.sh: wrote $archive"
fi
if [[ -n $push ]]; then
  tls=()
  [[ $push =~ ^docker://(127\.0\.0\.1|localhost)[:/] ]] && tls=(--tls-verify=false)
  "${buildah[@]}" push --quiet "${tls[@]}" "$tag" "$push"
  echo "build-image.sh: pushed $push"
fi
size=$("${buildah[@]}" images --format '{{.Size}}' "$tag")
digest=$("${buildah[@]}" inspect --type image --format '{{.FromImageDigest}}' "$tag")
echo "build-image.sh: built $tag ($digest), $size unpacked"
