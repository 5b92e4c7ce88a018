#!/usr/bin/env bash
# A real Kubernetes node for the test control plane: containerd, runc and the CNI bridge plugin
# from Debian, kubelet and kube-scheduler built from the same Debian kubernetes 1.20.2 source
# as the apiserver (hack/control-plane.sh), and images built here (no registry is reachable).
#
#   hack/node.sh install          Debian packages (containerd, runc, containernetworking-plugins,
#                                 busybox-static, iptables), kubelet and kube-scheduler (built from
#                                 the control plane's cached source tree, about 2 minutes once),
#                                 the pause binary (compiled from that tree's build/pause)
#   hack/node.sh images [--operator BIN] [--stub BIN]
#                                 builds the images as `docker save` tarballs (hack/image.py) and
#                                 imports them into the node's containerd: pause, busybox, and,
#                                 when given, the operator and the OpenAI-compatible stub
#   hack/node.sh containerd       starts the node's own containerd unless it runs
#   hack/node.sh kubelet KUBECONFIG DIR
#                                 runs the kubelet in the foreground (logs, certificates in DIR);
#                                 the test fixture runs it as a child, so it dies with the tests
#   hack/node.sh scheduler KUBECONFIG
#                                 runs kube-scheduler in the foreground
#   hack/node.sh up KUBECONFIG DIR
#                                 containerd, kubelet and scheduler in the background; waits until
#                                 the node is Ready (make demo)
#   hack/node.sh down DIR         stops what `up` started: the pods first, then kubelet and scheduler
#   hack/node.sh drain KUBECONFIG deletes every workload and pod while the kubelet runs (the test
#                                 fixture calls it before it stops the kubelet)
#   hack/node.sh stop             stops containerd and the containers it runs
#   hack/node.sh env              prints the settings as shell variables
#
# Binaries go to ${VOLT_CACHE_DIR:-~/.cache/volt-operator}/bin like the control plane's; image
# tarballs and configuration to .../node. containerd keeps its images in $VOLT_NODE_ROOT
# (/var/lib/volt-node), so an image imported once stays until its content changes. Every
# command is idempotent. One node per machine: the kubelet's ports (10250) are fixed.
#
# The node: name `volt-node`, pods on the bridge volt0 with 10.88.0.0/16 (host-local IPAM), the
# node's address 10.88.0.1 (the bridge's). There is no kube-proxy: one iptables DNAT rule sends
# the `kubernetes` Service (the in-cluster API address) to the apiserver, which must then listen
# beyond loopback (the test fixture does with VOLT_TEST_APISERVER_BIND=0.0.0.0).
#
# --sync-frequency=10s (default 1m): kubelet 1.20's pod workers can miss a graceful deletion
# that arrives while the pod is still starting (fixed by 1.22's pod lifecycle rework); the
# periodic resync then stops the pod. Seen here as a cancelled step's container running on for
# up to a minute.
#
# Settings that this machine needs (a gVisor sandbox without CAP_SYS_RESOURCE, cgroup v1 and no
# systemd): containerd's CRI with restrict_oom_score_adj (the sandbox may not lower its OOM
# score) and the cgroupfs driver; the kubelet with --cgroups-per-qos=false
# --enforce-node-allocatable= --fail-swap-on=false.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE_DIR=${VOLT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/volt-operator}
BIN_DIR=$CACHE_DIR/bin
NODE_CACHE=$CACHE_DIR/node
K8S_SRC=$CACHE_DIR/build/kubernetes-1.20.2
NODE_ROOT=${VOLT_NODE_ROOT:-/var/lib/volt-node}
RUN_DIR=${VOLT_NODE_RUN:-/run/volt-node}
SOCK=$RUN_DIR/containerd.sock
NODE_NAME=volt-node
BRIDGE=volt0
POD_CIDR=10.88.0.0/16
NODE_IP=10.88.0.1
# Image names: the real ones, so manifests work unchanged here and on a real cluster. The tags
# are never `latest` (whose default pull policy, Always, would try a registry).
PAUSE_IMAGE=registry.k8s.io/pause:3.6
BUSYBOX_IMAGE=docker.io/library/busybox:1.35
# The same busybox as a non-root image: its user is 1001, who owns /home/app.
NONROOT_IMAGE=localhost/busybox-nonroot:1.35
STUB_IMAGE=localhost/volt-openai-stub:dev
OPERATOR_IMAGE_REPO=ghcr.io/volt-dev/volt-operator

log() { printf '[node] %s\n' "$*" >&2; }
die() { printf '[node] error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

ctr_() { ctr --address "$SOCK" --namespace k8s.io "$@"; }

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  as_root apt-get update -qq
  log "apt-get install ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

chart_version() {
  sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$HERE/../charts/volt-operator/Chart.yaml"
}

# ---------------------------------------------------------------------------------------------
# install

build_node_binaries() {
  if [[ -x $BIN_DIR/kubelet && -x $BIN_DIR/kube-scheduler ]]; then return 0; fi
  [[ -d $K8S_SRC ]] || bash "$HERE/control-plane.sh" install
  local gopath=$CACHE_DIR/build/.go
  log "building kubelet and kube-scheduler (about 2 minutes on 2 cores)"
  (
    cd "$gopath/src/k8s.io/kubernetes"
    export GOPATH=$gopath CGO_ENABLED=0 GOFLAGS=-mod=vendor GO111MODULE=off GOTOOLCHAIN=local
    make WHAT="cmd/kubelet cmd/kube-scheduler" >"$CACHE_DIR/build/node-build.log" 2>&1 ||
      { tail -n 40 "$CACHE_DIR/build/node-build.log" >&2; exit 1; }
  )
  mkdir -p "$BIN_DIR"
  for b in kubelet kube-scheduler; do
    cp "$K8S_SRC/_output/bin/$b" "$BIN_DIR/$b.tmp"
    mv "$BIN_DIR/$b.tmp" "$BIN_DIR/$b"
  done
  log "built $("$BIN_DIR/kubelet" --version)"
}

build_pause() {
  if [[ -x $BIN_DIR/pause ]]; then return 0; fi
  [[ -d $K8S_SRC ]] || bash "$HERE/control-plane.sh" install
  apt_install gcc libc6-dev
  mkdir -p "$BIN_DIR"
  gcc -Os -static -DVERSION=3.6 -o "$BIN_DIR/pause.tmp" "$K8S_SRC/build/pause/linux/pause.c"
  strip "$BIN_DIR/pause.tmp"
  mv "$BIN_DIR/pause.tmp" "$BIN_DIR/pause"
}

write_configs() {
  mkdir -p "$NODE_CACHE/cni" "$RUN_DIR"
  cat >"$NODE_CACHE/containerd.toml.tmp" <<EOF
# Written by hack/node.sh; the node's own containerd (not the system's).
version = 2
root = "$NODE_ROOT/containerd"
state = "$RUN_DIR/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # This machine's sandbox may not lower a process's OOM score.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE_CACHE/cni"
EOF
  mv "$NODE_CACHE/containerd.toml.tmp" "$NODE_CACHE/containerd.toml"
  cat >"$NODE_CACHE/cni/10-volt.conflist.tmp" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "volt",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$NODE_ROOT/cni-ipam"
      }
    }
  ]
}
EOF
  mv "$NODE_CACHE/cni/10-volt.conflist.tmp" "$NODE_CACHE/cni/10-volt.conflist"
}

cmd_install() {
  apt_install containerd runc containernetworking-plugins busybox-static iptables
  # The package may start the system's containerd; the node runs its own on its own socket.
  build_node_binaries
  build_pause
  write_configs
  log "node binaries in $BIN_DIR"
}

# ---------------------------------------------------------------------------------------------
# containerd and images

containerd_running() {
  [[ -S $SOCK ]] && timeout 5 ctr --address "$SOCK" version >/dev/null 2>&1
}

cmd_containerd() {
  containerd_running && return 0
  [[ -f $NODE_CACHE/containerd.toml ]] || write_configs
  mkdir -p "$RUN_DIR" "$NODE_ROOT"
  log "starting containerd ($SOCK, log $RUN_DIR/containerd.log)"
  # Not holding the kubelet's lock (descriptor 9), which outlives the kubelet otherwise.
  setsid containerd --config "$NODE_CACHE/containerd.toml" >>"$RUN_DIR/containerd.log" 2>&1 </dev/null 9>&- &
  echo $! >"$RUN_DIR/containerd.pid"
  for _ in $(seq 1 100); do
    containerd_running && return 0
    sleep 0.1
  done
  tail -n 20 "$RUN_DIR/containerd.log" >&2
  die "containerd did not start"
}

# import NAME TARBALL: imports unless containerd already has NAME from this very tarball.
import_image() {
  local name=$1 tarball=$2
  local sum stamp=$NODE_ROOT/imported/$(echo "$name" | tr '/:' '__')
  sum=$(sha256sum "$tarball" | cut -d' ' -f1)
  if [[ -f $stamp && $(cat "$stamp") == "$sum" && $(ctr_ images ls -q "name==$name") == "$name" ]]; then
    return 0
  fi
  ctr_ images import --no-unpack=false "$tarball" >/dev/null
  mkdir -p "$NODE_ROOT/imported"
  echo "$sum" >"$stamp"
  log "imported $name"
}

image_py() { python3 "$HERE/image.py" "$@" >/dev/null; }

cmd_images() {
  local operator="" stub=""
  while (($#)); do
    case $1 in
      --operator) operator=$2; shift 2 ;;
      --stub) stub=$2; shift 2 ;;
      *) die "images: unknown argument $1" ;;
    esac
  done
  [[ -x $BIN_DIR/pause ]] || build_pause
  cmd_containerd
  mkdir -p "$NODE_CACHE/images"
  local out=$NODE_CACHE/images
  [[ -f $out/pause.tar ]] || image_py --tag "$PAUSE_IMAGE" --out "$out/pause.tar" \
    --file "$BIN_DIR/pause:/pause:0755" --entrypoint '["/pause"]' --user 65535:65535
  import_image "$PAUSE_IMAGE" "$out/pause.tar"

  if [[ ! -f $out/busybox.tar ]]; then
    local links=()
    for applet in $(/bin/busybox --list); do
      [[ $applet == busybox ]] || links+=(--link "/bin/$applet:busybox")
    done
    image_py --tag "$BUSYBOX_IMAGE" --out "$out/busybox.tar" --file /bin/busybox:/bin/busybox:0755 \
      "${links[@]}" --dir /tmp:1777 --dir /root:0700 --dir /home:0755 --cmd '["sh"]'
  fi
  import_image "$BUSYBOX_IMAGE" "$out/busybox.tar"

  if [[ ! -f $out/busybox-nonroot.tar ]]; then
    local links=()
    for applet in $(/bin/busybox --list); do
      [[ $applet == busybox ]] || links+=(--link "/bin/$applet:busybox")
    done
    image_py --tag "$NONROOT_IMAGE" --out "$out/busybox-nonroot.tar" --file /bin/busybox:/bin/busybox:0755 \
      "${links[@]}" --dir /tmp:1777 --dir /home/app:0755:1001 --user 1001:1001 --workdir /home/app --cmd '["sh"]'
  fi
  import_image "$NONROOT_IMAGE" "$out/busybox-nonroot.tar"

  if [[ -n $stub ]]; then
    image_py --tag "$STUB_IMAGE" --out "$out/openai-stub.tar" \
      --file "$stub:/usr/local/bin/openai-stub:0755" --libs-of "$stub" --dir /tmp:1777 \
      --entrypoint '["/usr/local/bin/openai-stub"]' --user 65532:65532 --expose 8000 \
      --label org.opencontainers.image.description="A STUB OpenAI-compatible model server for tests and demos: canned replies, no model"
    import_image "$STUB_IMAGE" "$out/openai-stub.tar"
  fi

  if [[ -n $operator ]]; then
    # The operator's binary links glibc dynamically and no musl target is installed here: the
    # image carries the libraries `ldd` lists (the Dockerfile's static build is for registries).
    local version
    version=$(chart_version)
    image_py --tag "$OPERATOR_IMAGE_REPO:$version" --out "$out/operator.tar" \
      --file "$operator:/usr/local/bin/volt-operator:0755" --libs-of "$operator" \
      --file /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:0644 \
      --dir /tmp:1777 --user 65532:65532 --expose 8080 \
      --entrypoint '["/usr/local/bin/volt-operator"]' --cmd '["run"]'
    import_image "$OPERATOR_IMAGE_REPO:$version" "$out/operator.tar"
  fi
}

# ---------------------------------------------------------------------------------------------
# kubelet and scheduler

kubeconfig_server() {
  sed -n 's/^ *server: *//p' "$1" | head -n1
}

ensure_network() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
  fi
  local addrs
  addrs=$(ip -4 addr show dev "$BRIDGE")
  [[ $addrs == *"inet $NODE_IP/"* ]] || ip addr add "$NODE_IP/16" dev "$BRIDGE"
  ip link set "$BRIDGE" up
}

# The kubernetes Service (what in-cluster clients dial) to the apiserver of KUBECONFIG.
route_api_service() {
  local kubeconfig=$1 server port cluster_ip
  server=$(kubeconfig_server "$kubeconfig")
  port=${server##*:}
  [[ $port =~ ^[0-9]+$ ]] || die "cannot read the apiserver port from $kubeconfig ($server)"
  cluster_ip=""
  for _ in $(seq 1 50); do
    cluster_ip=$(kubectl --kubeconfig "$kubeconfig" get service kubernetes -n default -o jsonpath='{.spec.clusterIP}' 2>/dev/null || true)
    [[ -n $cluster_ip ]] && break
    sleep 0.2
  done
  [[ -n $cluster_ip ]] || die "no kubernetes Service in the cluster of $kubeconfig"
  iptables -t nat -N VOLT-NODE-API 2>/dev/null || true
  iptables -t nat -F VOLT-NODE-API
  iptables -t nat -A VOLT-NODE-API -d "$cluster_ip/32" -p tcp --dport 443 -j DNAT --to-destination "$NODE_IP:$port"
  for chain in PREROUTING OUTPUT; do
    iptables -t nat -C "$chain" -j VOLT-NODE-API 2>/dev/null || iptables -t nat -A "$chain" -j VOLT-NODE-API
  done
}

cmd_kubelet() {
  local kubeconfig=${1:?usage: node.sh kubelet KUBECONFIG DIR} dir=${2:?usage: node.sh kubelet KUBECONFIG DIR}
  [[ -x $BIN_DIR/kubelet ]] || die "no kubelet in $BIN_DIR: run hack/node.sh install"
  mkdir -p "$RUN_DIR" "$dir"
  # One node per machine. The lock is held by the kubelet itself (it inherits the descriptor).
  exec 9>"$RUN_DIR/kubelet.lock"
  flock -n 9 || die "another kubelet of hack/node.sh runs on this machine ($RUN_DIR/kubelet.lock)"
  cmd_containerd
  ensure_network
  route_api_service "$kubeconfig"
  mkdir -p "$NODE_ROOT/kubelet" "$dir/pki" "$NODE_CACHE/volume-plugins"
  [[ -z ${VOLT_NODE_PIDFILE:-} ]] || echo $$ >"$VOLT_NODE_PIDFILE"
  exec "$BIN_DIR/kubelet" \
    --kubeconfig="$kubeconfig" \
    --container-runtime=remote \
    --container-runtime-endpoint="unix://$SOCK" \
    --image-service-endpoint="unix://$SOCK" \
    --runtime-request-timeout=5m \
    --root-dir="$NODE_ROOT/kubelet" \
    --cert-dir="$dir/pki" \
    --volume-plugin-dir="$NODE_CACHE/volume-plugins" \
    --hostname-override="$NODE_NAME" \
    --node-ip="$NODE_IP" \
    --pod-infra-container-image="$PAUSE_IMAGE" \
    --cgroup-driver=cgroupfs \
    --cgroups-per-qos=false \
    --enforce-node-allocatable= \
    --fail-swap-on=false \
    --anonymous-auth=true \
    --authorization-mode=AlwaysAllow \
    --read-only-port=0 \
    --healthz-bind-address=127.0.0.1 \
    --eviction-hard='memory.available<1Mi,nodefs.available<1%,imagefs.available<1%' \
    --image-gc-high-threshold=100 \
    --image-gc-low-threshold=99 \
    --serialize-image-pulls=false \
    --resolv-conf=/etc/resolv.conf \
    --cluster-domain=cluster.local \
    --node-status-update-frequency=4s \
    --sync-frequency=10s \
    --logtostderr=true \
    --v="${VOLT_KUBELET_V:-1}"
}

cmd_scheduler() {
  local kubeconfig=${1:?usage: node.sh scheduler KUBECONFIG}
  [[ -x $BIN_DIR/kube-scheduler ]] || die "no kube-scheduler in $BIN_DIR: run hack/node.sh install"
  [[ -z ${VOLT_NODE_PIDFILE:-} ]] || echo $$ >"$VOLT_NODE_PIDFILE"
  exec "$BIN_DIR/kube-scheduler" \
    --kubeconfig="$kubeconfig" \
    --authentication-kubeconfig="$kubeconfig" \
    --authorization-kubeconfig="$kubeconfig" \
    --leader-elect=false \
    --port=0 \
    --bind-address=127.0.0.1 \
    --secure-port=0 \
    --logtostderr=true \
    --v=1
}

node_ready() {
  [[ $(kubectl --kubeconfig "$1" get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}

cmd_up() {
  local kubeconfig=${1:?usage: node.sh up KUBECONFIG DIR} dir=${2:?usage: node.sh up KUBECONFIG DIR}
  mkdir -p "$dir"
  cmd_containerd
  # Each writes its own pid (the same after exec), which `down` signals.
  VOLT_NODE_PIDFILE=$dir/kubelet.pid setsid bash "$0" kubelet "$kubeconfig" "$dir" >"$dir/kubelet.log" 2>&1 </dev/null &
  VOLT_NODE_PIDFILE=$dir/kube-scheduler.pid setsid bash "$0" scheduler "$kubeconfig" >"$dir/kube-scheduler.log" 2>&1 </dev/null &
  echo "$kubeconfig" >"$dir/kubeconfig-path"
  log "waiting for node $NODE_NAME to be Ready (logs in $dir)"
  for _ in $(seq 1 120); do
    if node_ready "$kubeconfig"; then
      log "node $NODE_NAME is Ready"
      return 0
    fi
    if [[ -s $dir/kubelet.pid ]] && ! kill -0 "$(cat "$dir/kubelet.pid")" 2>/dev/null; then
      tail -n 30 "$dir/kubelet.log" >&2
      die "the kubelet exited"
    fi
    sleep 0.5
  done
  tail -n 30 "$dir/kubelet.log" >&2
  die "node $NODE_NAME not Ready after 60 s"
}

# Deletes every workload and pod of KUBECONFIG's cluster while the kubelet runs: it kills the
# containers and tears the pod network down as it deletes each pod. What is left (a pod that
# would not go in time) the next kubelet removes as an orphan.
drain() {
  local kubeconfig=$1
  timeout 30 kubectl --kubeconfig "$kubeconfig" delete deployments,replicasets,statefulsets,daemonsets,jobs \
    --all --all-namespaces --wait=false >/dev/null 2>&1 || true
  # Finished pods have no container to stop: removed at once. (Kubelet 1.20 can leave one
  # Terminating for good: when its dead container was already garbage-collected, killing it
  # fails with NotFound, again and again.)
  local phase
  for phase in Succeeded Failed; do
    timeout 30 kubectl --kubeconfig "$kubeconfig" delete pods --all-namespaces --field-selector="status.phase==$phase" \
      --grace-period=0 --force >/dev/null 2>&1 || true
  done
  # A pod already being deleted with a longer grace period (a Deployment's, deleted by the
  # garbage collector) is stopped by kubelet 1.20 on its first schedule, not sooner: wait a
  # little, then leave what remains to the next kubelet, which removes its containers as orphans
  # (or to `hack/node.sh stop`).
  if ! timeout "${VOLT_NODE_DRAIN_SECONDS:-15}" kubectl --kubeconfig "$kubeconfig" delete pods --all --all-namespaces \
    --grace-period=1 --wait=true >/dev/null 2>&1; then
    log "pods still stopping (the next kubelet or hack/node.sh stop removes them):"
    kubectl --kubeconfig "$kubeconfig" get pods --all-namespaces --no-headers 2>&1 | head -n 20 >&2 || true
  fi
}

cmd_down() {
  local dir=${1:?usage: node.sh down DIR}
  if [[ -f $dir/kubeconfig-path ]]; then
    local kubeconfig
    kubeconfig=$(cat "$dir/kubeconfig-path")
    drain "$kubeconfig"
  fi
  for name in kube-scheduler kubelet; do
    if [[ -f $dir/$name.pid ]]; then
      kill "$(cat "$dir/$name.pid")" 2>/dev/null || true
      rm -f "$dir/$name.pid"
    fi
  done
}

cmd_stop() {
  containerd_running || return 0
  # Containers a kubelet left (pods of a cluster that is gone): killed and their tasks deleted,
  # which ends their shims. The next kubelet garbage-collects their sandboxes (and IPs).
  local task
  for task in $(ctr_ tasks ls -q 2>/dev/null); do
    ctr_ tasks kill -s SIGKILL "$task" >/dev/null 2>&1 || true
  done
  for task in $(ctr_ tasks ls -q 2>/dev/null); do
    ctr_ tasks delete --force "$task" >/dev/null 2>&1 || true
  done
  if [[ -f $RUN_DIR/containerd.pid ]]; then
    kill "$(cat "$RUN_DIR/containerd.pid")" 2>/dev/null || true
    rm -f "$RUN_DIR/containerd.pid"
  fi
}

cmd_env() {
  cat <<EOF
VOLT_NODE_BIN_DIR=$BIN_DIR
VOLT_NODE_SOCKET=$SOCK
VOLT_NODE_NAME=$NODE_NAME
VOLT_NODE_IP=$NODE_IP
VOLT_NODE_POD_CIDR=$POD_CIDR
VOLT_NODE_BUSYBOX_IMAGE=$BUSYBOX_IMAGE
VOLT_NODE_NONROOT_IMAGE=$NONROOT_IMAGE
VOLT_NODE_STUB_IMAGE=$STUB_IMAGE
VOLT_NODE_OPERATOR_IMAGE=$OPERATOR_IMAGE_REPO:$(chart_version)
EOF
}

case ${1:-} in
  install) cmd_install ;;
  images) shift; cmd_images "$@" ;;
  containerd) cmd_containerd ;;
  kubelet) shift; cmd_kubelet "$@" ;;
  scheduler) shift; cmd_scheduler "$@" ;;
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down "$@" ;;
  drain) shift; drain "${1:?usage: node.sh drain KUBECONFIG}" ;;
  stop) cmd_stop ;;
  env) cmd_env ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
