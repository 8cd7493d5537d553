# The controller and CLI (`strait`): built in the Rust image, run on distroless
# (glibc and libgcc only: no shell, no package manager) as a non-root user.
#   docker build -f deploy/docker/strait.Dockerfile -t ghcr.io/strait-dev/strait:v0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p strait-control-plane --bin strait \
    && cp target/release/strait /strait

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /strait /usr/local/bin/strait
# The uid the install's Deployment runs it as.
USER 2103:2103
ENTRYPOINT ["/usr/local/bin/strait"]
CMD ["controller", "--kubernetes"]
