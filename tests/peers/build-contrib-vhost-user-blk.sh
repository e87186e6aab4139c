#!/usr/bin/env bash
# Builds QEMU's contrib vhost-user-blk (the libvhost-user example daemon) from Debian bookworm's
# qemu source package, as a peer for the block benchmark (tests/src/bench/blk.rs looks for
# target/peers/vhost-user-blk-contrib). Debian ships no binary of it, so we build it ourselves.
#
# QEMU's own build (meson, ~300 MB of tree, a configure run) would take far longer than the
# daemon needs: it is three C files and a few headers. So we take only those out of the orig
# tarball, apply Debian's patches to just those files, and compile them with gcc directly. The one
# header that drags in the rest of QEMU, qemu/osdep.h, is replaced by a small shim of our own.
#
# Idempotent: exits at once if the binary exists. Needs root for apt-get (as on CI).
set -euo pipefail
cd "$(dirname "$0")/../.."

out=target/peers/vhost-user-blk-contrib
if [[ -x $out ]]; then
  echo "$out"
  exit 0
fi
start=$SECONDS
src=target/peers/src
mkdir -p "$src"

# --- apt: a deb-src entry for bookworm, and the build tools ------------------------------------

# Whether apt already has a bookworm source index configured, whichever file or format it
# comes from (indextargets reads one-line .list and deb822 .sources alike). A deb-src for
# another suite does not count: apt-get source would fetch that suite's qemu.
have_bookworm_src() {
  apt-get indextargets --no-release-info --format '$(TARGET_OF) $(RELEASE)' 2>/dev/null |
    grep -x 'deb-src bookworm' >/dev/null  # not -q: an early exit could SIGPIPE apt under pipefail
}

# Writes a deb-src entry that mirrors the existing `deb ... bookworm` one, in the same format and
# with the same options. Copying Signed-By matters: apt refuses a second entry for the same
# repository whose Signed-By differs ("Conflicting values set for option Signed-By").
add_bookworm_src() {
  local f entry
  # deb822 (.sources, as Debian's bookworm container images have it): copy the first enabled stanza whose
  # Types has deb and whose Suites has bookworm, narrowed to Types: deb-src, Suites: bookworm.
  # Other fields (URIs, Components, Signed-By, even a multi-line inline key) pass through.
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    entry=$(awk 'BEGIN { RS = "" }
      function has(field, word,   w, k, i) {   # does the stanza field list the word?
        k = split(field, w, /[ \t]+/)
        for (i = 2; i <= k; i++) if (w[i] == word) return 1
        return 0
      }
      {
        n = split($0, l, "\n"); types = suites = enabled = ""
        for (i = 1; i <= n; i++) {
          if (l[i] ~ /^Types:/) types = l[i]
          else if (l[i] ~ /^Suites:/) suites = l[i]
          else if (l[i] ~ /^Enabled:/) enabled = l[i]
        }
        if (!has(types, "deb") || !has(suites, "bookworm") || has(enabled, "no")) next
        for (i = 1; i <= n; i++) {
          if (l[i] ~ /^Types:/) l[i] = "Types: deb-src"
          else if (l[i] ~ /^Suites:/) l[i] = "Suites: bookworm"
          print l[i]
        }
        exit
      }' "$f")
    if [[ -n $entry ]]; then
      printf '# Added by tests/peers/build-contrib-vhost-user-blk.sh, copied from %s\n%s\n' \
        "$f" "$entry" >/etc/apt/sources.list.d/bulkhead-deb-src.sources
      return
    fi
  done
  # One-line format: copy the first `deb [options] URI bookworm components` line as deb-src.
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    entry=$(awk '$1 == "deb" {
        line = $0; rest = $0
        sub(/^[ \t]*deb[ \t]+/, "", rest)
        if (rest ~ /^\[/) sub(/^\[[^]]*\][ \t]*/, "", rest)   # [arch=... signed-by=...]
        split(rest, w, /[ \t]+/)                              # w[1] URI, w[2] suite
        if (w[2] == "bookworm") { sub(/^[ \t]*deb/, "deb-src", line); print line; exit }
      }' "$f")
    if [[ -n $entry ]]; then
      printf '# Added by tests/peers/build-contrib-vhost-user-blk.sh, copied from %s\n%s\n' \
        "$f" "$entry" >/etc/apt/sources.list.d/bulkhead-deb-src.list
      return
    fi
  done
  # No bookworm deb entry to mirror (unusual): Debian's default mirror, keys from trusted.gpg.d.
  echo 'deb-src http://deb.debian.org/debian bookworm main' \
    >/etc/apt/sources.list.d/bulkhead-deb-src.list
}

packages=(
  dpkg-dev        # apt-get source (and patch, which it depends on)
  xz-utils        # the orig tarball is .tar.xz
  libglib2.0-dev  # libvhost-user-glib and the daemon's main loop and option parsing
  pkg-config
  gcc
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
export DEBIAN_FRONTEND=noninteractive
need_update=0
if ! have_bookworm_src; then
  add_bookworm_src
  need_update=1
fi
# An empty or stale list (a fresh machine) would make both install and source fail.
((${#missing[@]})) && need_update=1
apt-cache showsrc --only-source qemu 2>/dev/null | grep '^Package: qemu' >/dev/null || need_update=1
if ((need_update)); then
  apt-get update -qq
fi
if ((${#missing[@]})); then
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- source: download only, then take out the few files we compile -----------------------------

# The .dsc names the tarballs; download only if we have none (the download is ~24 MB). If several
# versions piled up, the newest wins. apt warns that _apt cannot write here and downloads as
# root instead; that is harmless.
newest_dsc() { find "$src" -maxdepth 1 -name 'qemu_*.dsc' | sort -V | tail -n1; }
dsc=$(newest_dsc)
if [[ -z $dsc ]]; then
  (cd "$src" && apt-get source --download-only -qq qemu)
  dsc=$(newest_dsc)
  [[ -n $dsc ]] || { echo "apt-get source qemu left no .dsc in $src" >&2; exit 1; }
fi
# The Files: section of a .dsc is "md5 size name" lines.
orig=$(awk '/^Files:/ { f = 1; next } /^[^ ]/ { f = 0 } f && $3 ~ /\.orig\.tar\./ { print $3 }' "$dsc")
debian=$(awk '/^Files:/ { f = 1; next } /^[^ ]/ { f = 0 } f && $3 ~ /\.debian\.tar\./ { print $3 }' "$dsc")
version=$(awk '/^Version:/ { print $2 }' "$dsc")
echo "building contrib vhost-user-blk from qemu $version"

tree=$src/tree
rm -rf "$tree"
mkdir -p "$tree"
# Only what the three C files include: libvhost-user (its include/ and standard-headers/ are
# symlinks into the top-level include/, so those targets come too), and the daemon itself.
tar -xf "$src/$orig" -C "$tree" --strip-components=1 --wildcards \
  '*/contrib/vhost-user-blk/vhost-user-blk.c' \
  '*/subprojects/libvhost-user/*' \
  '*/include/qemu/atomic.h' \
  '*/include/qemu/compiler.h' \
  '*/include/standard-headers/linux/*'

# Debian's patches (upstream 7.2.x stable diffs) do touch libvhost-user.c. Apply, in series
# order, only the parts that change files we extracted: each patch is cut into its
# `diff --git` sections and a section is kept if its target is one of our files.
tar -xf "$src/$debian" -C "$tree" debian/patches
(cd "$tree" && find . -path ./debian -prune -o -type f -print | sed 's|^\./||') >"$tree/.files"
while read -r name _; do
  [[ -z $name || $name == \#* ]] && continue
  patchfile=$tree/debian/patches/$name
  part=$(awk 'NR == FNR { want[$0] = 1; next }
    function flush() { if (keep) printf "%s", buf; buf = ""; keep = 0 }
    /^diff --git / { flush() }
    { buf = buf $0 "\n" }
    /^\+\+\+ / { p = $2; sub(/^b\//, "", p); if (p in want) keep = 1 }
    END { flush() }' "$tree/.files" "$patchfile")
  # Guard against a patch in another format, whose sections the cut above would miss: every
  # `+++ b/<one of our files>` in the patch must have made it into the part we apply.
  expected=$(awk 'NR == FNR { want[$0] = 1; next }
    /^\+\+\+ / { p = $2; sub(/^b\//, "", p); if (p in want) n++ } END { print n + 0 }' \
    "$tree/.files" "$patchfile")
  got=$(printf '%s' "$part" | grep -c '^+++ ' || true)
  if ((expected != got)); then
    echo "debian/patches/$name: found $expected sections for our files, cut $got" >&2
    exit 1
  fi
  if ((got)); then
    echo "applying the libvhost-user/contrib parts of debian/patches/$name"
    printf '%s\n' "$part" | patch -d "$tree" -p1 -s --forward --no-backup-if-mismatch
  fi
done < <(cat "$tree/debian/patches/series"; echo)  # also a last line without a newline

# --- the osdep.h shim -----------------------------------------------------------------------------

# vhost-user-blk.c includes "qemu/osdep.h" for the C library, glib and container_of; MIN comes
# from glib. libvhost-user itself is self-contained (it is built as a standalone subproject).
mkdir -p "$tree/shim/qemu"
cat >"$tree/shim/qemu/osdep.h" <<'EOF'
/* Bulkhead's stand-in for QEMU's osdep.h: just what contrib/vhost-user-blk uses. */
#ifndef BULKHEAD_OSDEP_SHIM_H
#define BULKHEAD_OSDEP_SHIM_H
#include <assert.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>
#include <glib.h>

#define container_of(ptr, type, member) \
    ((type *)((char *)(ptr) - offsetof(type, member)))
#endif
EOF

# --- compile ----------------------------------------------------------------------------------

# -D_GNU_SOURCE as QEMU's meson.build passes it (O_DIRECT, lseek64, preadv); -pthread for
# libvhost-user. Built to a temporary name and moved into place only after the smoke test, so a
# failed run leaves no binary that the next run would take as cached.
lvu=$tree/subprojects/libvhost-user
# shellcheck disable=SC2046  # pkg-config's flags are meant to split
gcc -O2 -g -Wall -D_GNU_SOURCE -pthread \
  -I "$tree/shim" -I "$lvu" \
  "$tree/contrib/vhost-user-blk/vhost-user-blk.c" "$lvu/libvhost-user.c" "$lvu/libvhost-user-glib.c" \
  $(pkg-config --cflags --libs glib-2.0) \
  -o "$out.tmp"

# --- smoke test -------------------------------------------------------------------------------

# The daemon listens, then accepts one frontend; it opens the image only after that accept, so
# all this shows is that it starts and binds its socket.
tmp=$(mktemp -d)
pid=
cleanup() {
  if [[ -n $pid ]]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
truncate -s 64M "$tmp/image"
"$out.tmp" -b "$tmp/image" -s "$tmp/sock" &
pid=$!
for _ in $(seq 100); do
  [[ -S $tmp/sock ]] && break
  kill -0 "$pid" 2>/dev/null || { echo "vhost-user-blk-contrib exited at start" >&2; exit 1; }
  sleep 0.05
done
[[ -S $tmp/sock ]] || { echo "vhost-user-blk-contrib made no socket in 5 s" >&2; exit 1; }

mv "$out.tmp" "$out"
rm -rf "$tree"  # the tarballs stay in $src; the extracted tree is rebuilt on the next build
echo "built in $((SECONDS - start)) s"
echo "$out"
