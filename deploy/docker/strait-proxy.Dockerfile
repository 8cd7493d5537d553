# The sidecar (`strait-proxy`), which is also the init container
# (`strait-proxy init`), so it carries iptables (nft and legacy) and nothing
# else: distroless (glibc and libgcc, no shell, no package manager), non-root
# by default (the init container alone runs as root, with NET_ADMIN and NET_RAW).
#   docker build -f deploy/docker/strait-proxy.Dockerfile -t ghcr.io/strait-dev/strait-proxy:v0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p strait-proxy --bin strait-proxy \
    && cp target/release/strait-proxy /strait-proxy

# iptables and the libraries and extensions it loads, gathered in one tree
# (from the multiarch directory its library is in: amd64 and arm64 alike,
# with what a slim image has).
FROM debian:bookworm-slim AS iptables
RUN apt-get update && apt-get install -y --no-install-recommends iptables \
    && mkdir -p /out/usr/sbin /out/usr/lib \
    && cp -a /usr/sbin/xtables-nft-multi /usr/sbin/xtables-legacy-multi \
             /usr/sbin/iptables-nft-restore /usr/sbin/iptables-nft-save \
             /usr/sbin/iptables-legacy-restore /usr/sbin/iptables-legacy-save \
             /usr/sbin/ip6tables-nft-restore /usr/sbin/ip6tables-nft-save \
             /usr/sbin/ip6tables-legacy-restore /usr/sbin/ip6tables-legacy-save /out/usr/sbin/ \
    && lib=$(dirname "$(dpkg -L libxtables12 | grep -m1 '/libxtables\.so\.')") \
    && mkdir -p /out$lib \
    && cp -a $lib/xtables $lib/libxtables.so.* $lib/libip4tc.so.* \
             $lib/libip6tc.so.* $lib/libnftnl.so.* $lib/libmnl.so.* \
             $lib/libnetfilter_conntrack.so.* $lib/libnfnetlink.so.* /out$lib/

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=iptables /out/ /
COPY --from=build /strait-proxy /usr/local/bin/strait-proxy
USER 2102:2102
ENTRYPOINT ["/usr/local/bin/strait-proxy"]
