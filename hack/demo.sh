#!/usr/bin/env bash
# The main job on a fresh machine: a local control plane (the tests' own), the operator
# against it, the examples applied, and what users see with kubectl.
set -euo pipefail
cd "$(dirname "$0")/.."

bash hack/control-plane.sh install
cargo build --quiet --bin volt-operator --example dev_cluster

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== starting a local control plane (etcd, kube-apiserver, kube-controller-manager)"
./target/debug/examples/dev_cluster "$work/kubeconfig-path" >"$work/cluster.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 120); do [[ -s $work/kubeconfig-path ]] && break; sleep 0.5; done
[[ -s $work/kubeconfig-path ]] || { cat "$work/cluster.log"; echo "control plane did not start" >&2; exit 1; }
export KUBECONFIG=$(cat "$work/kubeconfig-path")

echo "== starting volt-operator run (logs: $work/operator.log)"
# On 127.0.0.2: the control plane's API is on 127.0.0.1, an address HTTP steps may not reach
# (README, Security), and the demo's HTTP step calls the operator's own /api/v1/stats.
./target/debug/volt-operator run --http-addr 127.0.0.2:18080 --log-format json >"$work/operator.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 60); do curl -fsS http://127.0.0.2:18080/readyz >/dev/null 2>&1 && break; sleep 0.5; done
curl -fsS http://127.0.0.2:18080/readyz && echo

echo "== kubectl apply -f examples/spec/ -f examples/demo/"
kubectl apply -f examples/spec/agents.yaml -f examples/spec/workflow.yaml -f examples/demo/hello.yaml

for _ in $(seq 1 60); do
  phase=$(kubectl get wfr hello-1 -o jsonpath='{.status.phase}' 2>/dev/null || true)
  [[ $phase == Succeeded || $phase == Failed ]] && break
  sleep 0.5
done

echo "== kubectl get volt"
kubectl get volt
echo "== kubectl get workflowruns -o wide"
kubectl get workflowruns -o wide
echo "== outputs of hello-1"
kubectl get wfr hello-1 -o jsonpath='{range .status.steps.*}{.phase}{"\t"}{.output}{"\n"}{end}'
echo "== Workflow conditions"
kubectl get vwf -o custom-columns='NAME:.metadata.name,READY:.status.conditions[?(@.type=="Ready")].status,MESSAGE:.status.conditions[?(@.type=="Ready")].message'
echo "== events of hello-1 (GET /api/v1/events?correlationId=...)"
uid=$(kubectl get wfr hello-1 -o jsonpath='{.metadata.uid}')
curl -fsS "http://127.0.0.2:18080/api/v1/events?correlationId=$uid" | python3 -c 'import json,sys; [print(e["id"], e["kind"], e.get("step",""), e.get("message","")) for e in json.load(sys.stdin)["events"]]'
echo "== GET /api/v1/stats"
curl -fsS http://127.0.0.2:18080/api/v1/stats | python3 -m json.tool
[[ $(kubectl get wfr hello-1 -o jsonpath='{.status.phase}') == Succeeded ]]
