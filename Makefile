# volt-operator: developer entry points. `make help` lists them.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: help deps test lint unit e2e chaos crds demo build release clean-cache local-demo manifests bench node-deps node-images node-test node-stop

help: ## List targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

deps: ## Install what the tests need (etcd, kube-apiserver, kube-controller-manager, helm, promtool, the MCP Python SDK, Chromium and Playwright), cached in ~/.cache/volt-operator
	bash hack/control-plane.sh install
	bash hack/mcp-peer.sh install
	bash hack/browser.sh install

build: ## Build the operator (debug)
	$(CARGO) build

release: ## Build the operator (release)
	$(CARGO) build --release

crds: build ## Regenerate crds/ from the Rust types, and the chart's copies and manifests/install.yaml
	./target/debug/volt-operator crd --out-dir crds
	$(MAKE) manifests

HELM ?= $(shell bash hack/control-plane.sh bin-dir)/helm

manifests: ## Copy crds/ into the chart and render manifests/install.yaml from it (tests check both)
	cp crds/*.yaml charts/volt-operator/crds/
	{ printf '%s\n' \
	    '# volt-operator: a plain install (kubectl apply -f manifests/install.yaml), rendered from' \
	    '# charts/volt-operator by `make manifests`; do not edit. The command:' \
	    '#   helm template volt-operator charts/volt-operator --namespace volt-system --include-crds --set namespace.create=true'; \
	  $(HELM) template volt-operator charts/volt-operator --namespace volt-system --include-crds --set namespace.create=true; \
	} > manifests/install.yaml

lint: ## rustfmt and clippy, warnings are errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

unit: ## Unit and property tests, and local mode end to end (no cluster)
	$(CARGO) test --lib --bins
	$(CARGO) test --test local

e2e: deps ## End-to-end tests against a real kube-apiserver, etcd and kube-controller-manager on loopback
	$(CARGO) test --test e2e -- --test-threads=$${E2E_THREADS:-4}

chaos: deps ## Fault injection on a real control plane: SIGKILL of the operator, a 30 s apiserver outage, 409s (VOLT_CHAOS_SEED=n replays)
	$(CARGO) test --test chaos

test: deps lint ## Everything CI runs: deps, lint, unit, end-to-end and fault-injection tests, a small benchmark run, the real-node suite
	$(CARGO) test --lib --bins
	$(CARGO) test --test local
	$(CARGO) test --test e2e -- --test-threads=$${E2E_THREADS:-4}
	$(CARGO) test --test chaos
	$(CARGO) build --bin volt-operator --example bench
	./target/debug/examples/bench --scale 0.02 --check --operator target/debug/volt-operator
	$(MAKE) node-test

node-deps: deps ## Install the real node: containerd, runc, CNI plugins (Debian), kubelet and kube-scheduler (built from the cached 1.20.2 source), pause
	bash hack/node.sh install

node-images: node-deps ## Build and import the node's images: pause, busybox, the stub model server, the operator (debug build)
	$(CARGO) build --bin volt-operator --example openai_stub
	bash hack/node.sh images --operator target/debug/volt-operator --stub target/debug/examples/openai_stub

node-test: node-images ## End-to-end tests on a real node (kubelet, containerd, CNI): container steps, agent replicas as pods, the operator as a 2-replica Deployment
	VOLT_TEST_APISERVER_BIND=0.0.0.0 $(CARGO) test --test node -- --test-threads=$${NODE_THREADS:-2} --show-output

node-stop: ## Stop the node's containerd and whatever containers it still runs
	bash hack/node.sh stop

demo: node-images ## A local control plane and a real node; the operator installed with helm; the development pipeline with agent replicas as pods; `kubectl get volt`
	bash hack/demo.sh

local-demo: ## Run examples/local/pipeline.yaml on this machine (no cluster) twice: the second run comes from the cache
	$(CARGO) build --release
	./target/release/volt-operator local run examples/local/pipeline.yaml
	./target/release/volt-operator local run examples/local/pipeline.yaml

BENCH_ARGS ?=

bench: deps ## Benchmarks (release build against a local control plane): prints a table and one JSON line per scenario; BENCH_ARGS="--scale 0.1" for a quick look
	$(CARGO) build --release --bin volt-operator --example bench --example cost_bench
	./target/release/examples/bench $(BENCH_ARGS)
	./target/release/examples/cost_bench $(BENCH_ARGS)
	# The web view's 2,000-step run page in headless Chromium, against a release build of the
	# in-process operator like the rest (its figures are printed: web view, 2,000-step run)
	$(CARGO) test --release --test e2e a_2000_step_run_page -- --nocapture
