#!/usr/bin/env bash
# kube-controller-manager for the garbage-collector test (tests/cluster/test_garbage_collector.py),
# built from the same Debian source package as ../shared/tools/envtest-assets.sh builds
# kube-apiserver from (v1.20.2, Go 1.19, the same reflect2/json-iterator swap), and cached next to
# it. About 20 min on 2 loaded cores the first time (Go's build cache helps when kube-apiserver was
# just built); then instant.
#
# usage: tests/cluster/build-controller-manager.sh [ASSETS_DIR]   (default: ~/.cache/envtest-assets/1.20.2)
# prints the binary's path as its last line.
set -euo pipefail
ASSETS=${1:-${HOME}/.cache/envtest-assets/1.20.2}
VERSION=1.20.5+really1.20.2-1.1+deb12u1
BIN="$ASSETS/kube-controller-manager"
mkdir -p "$ASSETS"
log() { echo "build-controller-manager: $*" >&2; }

if [ ! -x "$BIN" ]; then
  need_pkgs=()
  [ -x /usr/lib/go-1.19/bin/go ] || need_pkgs+=(golang-1.19-go)
  command -v rsync >/dev/null || need_pkgs+=(rsync)
  command -v dpkg-source >/dev/null || need_pkgs+=(dpkg-dev)
  [ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] || need_pkgs+=(golang-github-modern-go-reflect2-dev)
  [ -d /usr/share/gocode/src/github.com/json-iterator/go ] || need_pkgs+=(golang-github-json-iterator-go-dev)
  if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  fi
  work=$(mktemp -d /tmp/kube-controller-manager-build.XXXX)
  trap 'rm -rf "$work"' EXIT
  log "building kube-controller-manager $VERSION from Debian's source package"
  mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial"
  cat >"$work/apt/sources.list" <<SRC
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
SRC
  O=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache")
  apt-get "${O[@]}" update -qq
  (cd "$work" && apt-get "${O[@]}" source --download-only "kubernetes=$VERSION" -qq)
  dpkg-source -x "$work"/kubernetes_*.dsc "$work/src" >/dev/null
  cd "$work/src"
  # as for kube-apiserver: Go 1.18+ crashes the vendored reflect2 1.0.1
  rm -rf vendor/github.com/modern-go/reflect2 vendor/github.com/json-iterator/go
  cp -rL /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
  cp -rL /usr/share/gocode/src/github.com/json-iterator/go vendor/github.com/json-iterator/go
  find vendor/github.com/modern-go/reflect2 vendor/github.com/json-iterator/go -name '*_test.go' -delete
  PATH=/usr/lib/go-1.19/bin:$PATH GOPROXY=off GOFLAGS=-mod=vendor make WHAT=cmd/kube-controller-manager \
    >"$work/make.log" 2>&1 || { tail -n 20 "$work/make.log" >&2; exit 1; }
  install -m 0755 _output/bin/kube-controller-manager "$BIN.tmp"
  mv "$BIN.tmp" "$BIN"
  cd /
fi
"$BIN" --version >&2
echo "$BIN"
