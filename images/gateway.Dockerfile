# camelid-gateway: OpenAI-compatible gateway with guardrails, on distroless, non-root. No libtorch.
#   docker build -f images/gateway.Dockerfile -t ghcr.io/camelid-dev/camelid-gateway:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p camelid-gateway

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/camelid-gateway /usr/local/bin/camelid-gateway
USER 65532:65532
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/camelid-gateway"]
CMD ["--config", "/etc/camelid/gateway.yaml"]
