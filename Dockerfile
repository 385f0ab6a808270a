# The one image for every role (controller, agent, demo, simulate): `mig-autoscaler <subcommand>`.
# Build: docker build -t ghcr.io/mig-autoscaler/mig-autoscaler:$(git describe --tags --always) \
#   --build-arg MIG_AUTOSCALER_COMMIT=$(git rev-parse --short=12 HEAD) \
#   --build-arg MIG_AUTOSCALER_COMMIT_DATE=$(git log -1 --format=%cI) .
# (.git is not copied in; without the arguments `mig-autoscaler version` says commit unknown.)
# The Helm chart runs it as user 65532 with a read-only root filesystem; the agent gets nvidia-smi
# from the NVIDIA container runtime (NVIDIA_DRIVER_CAPABILITIES=utility), not from this image.

FROM rust:1.95-bookworm AS build
# cmake, a C++ compiler and libclang build HiGHS (the planner's ILP solver); see scripts/env.sh.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends cmake g++ libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
ARG MIG_AUTOSCALER_COMMIT=unknown
ARG MIG_AUTOSCALER_COMMIT_DATE=unknown
COPY . .
RUN cargo build --release --locked -p mig-autoscaler \
 && install -m 0755 target/release/mig-autoscaler /usr/local/bin/mig-autoscaler

FROM debian:bookworm-slim
# HiGHS is linked statically but needs the C++ runtime; ca-certificates for the API server's TLS.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libstdc++6 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/mig-autoscaler /usr/local/bin/mig-autoscaler
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mig-autoscaler"]
CMD ["--help"]
