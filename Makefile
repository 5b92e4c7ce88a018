# volt-operator: developer entry points. `make help` lists them.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: help deps test lint unit e2e crds demo build release clean-cache

help: ## List targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

deps: ## Install what the tests need (etcd, kube-apiserver, kube-controller-manager, helm, promtool), cached in ~/.cache/volt-operator
	bash hack/control-plane.sh install

build: ## Build the operator (debug)
	$(CARGO) build

release: ## Build the operator (release)
	$(CARGO) build --release

crds: build ## Regenerate crds/ from the Rust types
	./target/debug/volt-operator crd --out-dir crds

lint: ## rustfmt and clippy, warnings are errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

unit: ## Unit and property tests (no cluster)
	$(CARGO) test --lib --bins

e2e: deps ## End-to-end tests against a real kube-apiserver, etcd and kube-controller-manager on loopback
	$(CARGO) test --test e2e -- --test-threads=$${E2E_THREADS:-4}

test: deps lint ## Everything CI runs: deps, lint, unit and end-to-end tests
	$(CARGO) test --lib --bins
	$(CARGO) test --test e2e -- --test-threads=$${E2E_THREADS:-4}

demo: deps build ## Start a local control plane and the operator, apply the examples, show `kubectl get volt`
	bash hack/demo.sh
