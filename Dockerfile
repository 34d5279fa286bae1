# syntax=docker/dockerfile:1
# The sluice image: `sluice` (agent, install-cni) and `sluice-cni` (the CNI plugin that
# install-cni copies onto the node), on Debian with nft. charts/sluice runs it
# (image.repository ghcr.io/sluice-project/sluice, tag = the chart's appVersion).
#
#   docker build --build-arg SOURCE_DATE_EPOCH=$(git log -1 --format=%ct) \
#     -t ghcr.io/sluice-project/sluice:0.1.0 .
#
# Reproducible from the workspace: pinned base images and nftables version, Cargo.lock
# (--locked), no incremental state, source paths remapped; BuildKit stamps the image with
# SOURCE_DATE_EPOCH when it is passed as above. Pin the bases by digest
# (FROM image:tag@sha256:...) for bit-for-bit rebuilds of a release.

# ---- build ------------------------------------------------------------------------------------
# Rust as the workspace is built and tested with (rust-version 1.85 is the minimum), on the same
# Debian release as the runtime image (same glibc).
FROM docker.io/library/rust:1.95.0-slim-bookworm AS build
WORKDIR /src
ENV CARGO_INCREMENTAL=0 \
    CARGO_TERM_COLOR=never \
    RUSTFLAGS="--remap-path-prefix=/src=. --remap-path-prefix=/usr/local/cargo=/cargo"
# the whole workspace (cargo resolves every member's manifest), minus .dockerignore's
COPY . .
RUN cargo build --release --locked -p sluice -p sluice-cni \
 && install -D -m 0755 target/release/sluice /out/sluice \
 && install -D -m 0755 target/release/sluice-cni /out/sluice-cni

# ---- runtime ----------------------------------------------------------------------------------
FROM docker.io/library/debian:bookworm-slim
# nftables: the `nft` the agent drives, the very package the project is tested with (Debian 12's
# 1.0.6-2+deb12u2; a Debian point release that replaces it fails this step: bump it then).
# Nothing else: the agent talks to the API server itself (rustls, webpki roots built in) and
# install-cni only copies files.
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables=1.0.6-2+deb12u2 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log
# install-cni copies sluice-cni from next to its own binary (its --plugin-binary default)
COPY --from=build /out/sluice /out/sluice-cni /usr/local/bin/
# Root, not a USER: the agent needs CAP_NET_ADMIN for nftables (granted to root by the
# DaemonSet, which drops every other capability), the CNI socket admits root only (the runtime
# runs sluice-cni as root), and install-cni writes into the node's root-owned CNI dirs. The
# chart runs both containers with a read-only root filesystem, no privilege escalation and
# seccomp RuntimeDefault.
USER 0:0
ENTRYPOINT ["sluice"]
CMD ["agent"]
