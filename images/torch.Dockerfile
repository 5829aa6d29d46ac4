# camelid-trainer and camelid-worker (with `camelid`, whose `serve` and `eval gate` the FineTuneJob's evaluation Job
# runs): CUDA 13 + libtorch from PyPI torch 2.11 (the same libtorch tch 0.24 builds
# against), non-root (uid 1000, as the operator's pods expect).
#   docker build -f images/torch.Dockerfile --target trainer -t ghcr.io/camelid-dev/camelid-trainer:0.1.0 .
#   docker build -f images/torch.Dockerfile --target worker  -t ghcr.io/camelid-dev/camelid-worker:0.1.0 .
FROM nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04 AS build
RUN apt-get update -q && apt-get install -y -q --no-install-recommends \
        curl ca-certificates build-essential pkg-config python3 python3-venv libgloo-dev \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
ENV PATH=/root/.cargo/bin:$PATH
RUN python3 -m venv /opt/torch && /opt/torch/bin/pip install -q torch==2.11.0
ENV LIBTORCH_USE_PYTORCH=1 PATH=/opt/torch/bin:$PATH
WORKDIR /src
COPY . .
# The trainer shards across GPUs through c10d's ProcessGroupNCCL: CUDA headers from the toolkit, NCCL's from the
# nvidia-nccl-cu13 wheel torch installs (c10d/README.md).
RUN CAMELID_CUDA_INCLUDE=/usr/local/cuda/include \
    cargo build --release --locked -p camelid-trainer -p camelid-worker -p camelid-cli --features camelid-trainer/nccl

FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS runtime
RUN apt-get update -q && apt-get install -y -q --no-install-recommends python3 libgomp1 \
    && rm -rf /var/lib/apt/lists/* && useradd --uid 1000 --create-home camelid
COPY --from=build /opt/torch /opt/torch
ENV LD_LIBRARY_PATH=/opt/torch/lib/python3.12/site-packages/torch/lib
USER 1000:1000

FROM runtime AS trainer
COPY --from=build /src/target/release/camelid-trainer /usr/local/bin/camelid-trainer
ENTRYPOINT ["/usr/local/bin/camelid-trainer"]

FROM runtime AS worker
COPY --from=build /src/target/release/camelid-worker /usr/local/bin/camelid-worker
COPY --from=build /src/target/release/camelid /usr/local/bin/camelid
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/camelid-worker"]
