#!/usr/bin/env bash
# `make demo`: the main job on a fresh machine, on a real (local) cluster.
#
#   1. a local control plane (the tests' own: etcd, kube-apiserver, kube-controller-manager) and
#      a real node (hack/node.sh: kubelet, containerd, CNI bridge, kube-scheduler);
#   2. the operator installed with `helm install`, as the README says, from the image
#      `make node-images` built and imported (the chart's default name and tag);
#   3. the chart NOTES' hello run, then the development pipeline (examples/demo/pipeline.yaml)
#      with its agent replicas as pods: STUB model servers (examples/openai_stub.rs, canned
#      replies, no model) unless VOLT_DEMO_BASE_URL points the Agents at a real
#      OpenAI-compatible endpoint (VOLT_DEMO_API_KEY, VOLT_DEMO_MODEL with it);
#   4. what users see: kubectl get volt, the pods on the node, the outputs, /api/v1/stats.
#
# VOLT_DEMO_KEEP=1 keeps everything running until Ctrl-C (it prints the KUBECONFIG).
# Run through `make demo`, which first builds and imports the images (make node-images).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --quiet --example dev_cluster

work=$(mktemp -d)
cluster_pid=""
pf_pid=""
cleanup() {
  [[ -n $pf_pid ]] && kill "$pf_pid" 2>/dev/null || true
  if [[ -f $work/node/kubeconfig-path ]]; then bash hack/node.sh down "$work/node" || true; fi
  [[ -n $cluster_pid ]] && kill "$cluster_pid" 2>/dev/null || true
  # Containers still stopping when the kubelet went (a Deployment's pods) go with containerd.
  bash hack/node.sh stop || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== a local control plane (etcd, kube-apiserver, kube-controller-manager)"
# The apiserver listens beyond loopback so that pods (the operator's) reach it.
VOLT_TEST_APISERVER_BIND=0.0.0.0 ./target/debug/examples/dev_cluster "$work/kubeconfig-path" >"$work/cluster.log" 2>&1 &
cluster_pid=$!
for _ in $(seq 1 240); do [[ -s $work/kubeconfig-path ]] && break; sleep 0.5; done
[[ -s $work/kubeconfig-path ]] || { cat "$work/cluster.log"; echo "the control plane did not start" >&2; exit 1; }
KUBECONFIG=$(cat "$work/kubeconfig-path")
export KUBECONFIG

echo "== a real node: kubelet, containerd, CNI bridge, kube-scheduler (logs in $work/node)"
bash hack/node.sh up "$KUBECONFIG" "$work/node"
kubectl get nodes -o wide

echo "== helm install volt-operator charts/volt-operator --namespace volt-system --create-namespace"
HELM=$(bash hack/control-plane.sh bin-dir)/helm
"$HELM" install volt-operator charts/volt-operator --namespace volt-system --create-namespace | sed -n '/^NOTES/,$p'
kubectl -n volt-system rollout status deployment/volt-operator --timeout=180s
kubectl -n volt-system get lease volt-operator -o jsonpath='{.spec.holderIdentity}{"\n"}' 2>/dev/null || true

wait_run() {
  local run=$1 phase=""
  for _ in $(seq 1 300); do
    phase=$(kubectl get wfr "$run" -o jsonpath='{.status.phase}' 2>/dev/null || true)
    [[ $phase == Succeeded || $phase == Failed || $phase == Cancelled ]] && break
    sleep 0.5
  done
  echo "$run: ${phase:-no status}"
}

echo "== kubectl apply -f examples/demo/hello.yaml   (the chart NOTES' example)"
kubectl apply -f examples/demo/hello.yaml
wait_run hello-1
kubectl get wfr hello-1 -o jsonpath='{.status.steps.summary.output}{"\n"}'

echo "== the Agents"
if [[ -n ${VOLT_DEMO_BASE_URL:-} ]]; then
  echo "   (real endpoint $VOLT_DEMO_BASE_URL, model ${VOLT_DEMO_MODEL:-gpt-4o-mini})"
  kubectl create secret generic openai --from-literal=api-key="${VOLT_DEMO_API_KEY:-none}" --dry-run=client -o yaml | kubectl apply -f -
  # The same Agents as examples/demo/agents.yaml, with an endpoint instead of stub replicas.
  model=${VOLT_DEMO_MODEL:-gpt-4o-mini}
  for spec in "analyst|analysis|You are a precise requirements analyst." \
    "planner|planning|You are a technical lead. You split work into small tasks and answer with JSON only." \
    "coder|code, review|You are a skilled software developer. You answer with a unified diff."; do
    IFS='|' read -r name caps instructions <<<"$spec"
    kubectl apply -f - <<AGENT
apiVersion: volt.dev/v1alpha1
kind: Agent
metadata: {name: $name, labels: {volt.dev/demo: real-endpoint}}
spec:
  model: $model
  instructions: $instructions
  capabilities: [$caps]
  maxConcurrency: 4
  timeoutSeconds: 120
  apiKeySecretRef: {name: openai, key: api-key}
  endpoint: {baseUrl: "$VOLT_DEMO_BASE_URL"}
AGENT
  done
else
  echo "   (their replicas are STUB model servers: canned replies, no model; see examples/demo/agents.yaml)"
  kubectl apply -f examples/demo/agents.yaml
fi
for _ in $(seq 1 240); do
  ready=$(kubectl get agents -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{" "}{end}')
  [[ $ready == "True True True " ]] && break
  sleep 0.5
done
kubectl get agents

echo "== kubectl apply -f examples/demo/pipeline.yaml   (the development pipeline)"
kubectl apply -f examples/demo/pipeline.yaml
wait_run dev-1

echo "== kubectl get volt"
kubectl get volt
echo "== kubectl get workflowruns -o wide"
kubectl get workflowruns -o wide
echo "== pods on the node: agent replicas (stub model servers) and step pods"
kubectl get pods -A -o wide
echo "== steps of dev-1: phase, agent replica or pod, output"
kubectl get wfr dev-1 -o go-template='{{range $k, $s := .status.steps}}{{printf "%-13s" $k}} {{$s.phase}}  {{or $s.replica $s.pod ""}}  {{or $s.output $s.message ""}}{{"\n"}}{{end}}' | cut -c1-160
echo "== load per replica (kubectl get agent coder -o jsonpath='{.status.endpoints}')"
kubectl get agent coder -o jsonpath='{range .status.endpoints[*]}{.pod}{"  healthy="}{.healthy}{"  completed="}{.completed}{"  ewmaLatencyMs="}{.ewmaLatencyMs}{"\n"}{end}'

echo "== GET /api/v1/stats (kubectl -n volt-system port-forward deployment/volt-operator 18080:8080)"
kubectl -n volt-system port-forward deployment/volt-operator 18080:8080 >"$work/port-forward.log" 2>&1 &
pf_pid=$!
for _ in $(seq 1 40); do curl -fsS localhost:18080/healthz >/dev/null 2>&1 && break; sleep 0.25; done
# The JSON API wants a bearer token the cluster accepts, of a caller allowed the path: a
# ServiceAccount bound to the chart's volt-operator-stats-reader ClusterRole.
kubectl -n volt-system create serviceaccount volt-stats-demo --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl create clusterrolebinding volt-stats-demo --clusterrole=volt-operator-stats-reader \
  --serviceaccount=volt-system:volt-stats-demo --dry-run=client -o yaml | kubectl apply -f - >/dev/null
stats_token=$(kubectl -n volt-system create token volt-stats-demo)
curl -fsS -H "Authorization: Bearer $stats_token" localhost:18080/api/v1/stats | python3 -c 'import json,sys; s=json.load(sys.stdin); print(json.dumps({k: s[k] for k in ("health","leadership","agents","runs","cache")}, indent=1))'

[[ $(kubectl get wfr dev-1 -o jsonpath='{.status.phase}') == Succeeded ]] || { echo "dev-1 did not succeed" >&2; exit 1; }

if [[ ${VOLT_DEMO_KEEP:-} == 1 ]]; then
  echo
  echo "Still running: export KUBECONFIG=$KUBECONFIG   (Ctrl-C stops everything)"
  while true; do sleep 3600; done
fi
