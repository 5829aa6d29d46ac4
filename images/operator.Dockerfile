# camelid-operator: a static-ish Rust binary on distroless, non-root. No libtorch.
#   docker build -f images/operator.Dockerfile -t ghcr.io/camelid-dev/camelid-operator:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p camelid-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/camelid-operator /usr/local/bin/camelid-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/camelid-operator"]
CMD ["run"]
