# syntax=docker/dockerfile:1
#
# The operator image: the one `volt-operator` binary, linked statically (musl), on
# distroless/static, running as the non-root user 65532.
#
#   docker build -t ghcr.io/volt-dev/volt-operator:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t ... --push .
#
# Each platform builds natively (under emulation with buildx), so the Rust target follows the
# build machine's architecture. TLS is rustls with ring: no OpenSSL, no libc at run time.
#
# The test node (hack/node.sh images, docs/real-node.md) has no Docker engine and no musl
# target: it builds its local image of the same name by hand, from the glibc debug binary and
# the libraries it links. This file is the image for real registries.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add "$(uname -m)-unknown-linux-musl"
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    target="$(uname -m)-unknown-linux-musl" \
 && cargo build --release --locked --bin volt-operator --target "$target" \
 && install -D -m 0755 "target/$target/release/volt-operator" /out/volt-operator

FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="volt-operator" \
      org.opencontainers.image.description="A Kubernetes operator that orchestrates AI-agent workflows" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/volt-dev/volt-operator"
COPY --from=builder /out/volt-operator /usr/local/bin/volt-operator
USER 65532:65532
EXPOSE 8080
# `volt-operator run` by default; `docker run IMAGE crd` prints the CRDs.
ENTRYPOINT ["/usr/local/bin/volt-operator"]
CMD ["run"]
