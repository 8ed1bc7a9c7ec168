# Multi-stage build: the RocksDB C++ build needs clang and g++ only in the builder.
# The base images are arguments so that a mirror (or a locally built image) can stand in.
ARG BUILDER_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim
FROM ${BUILDER_IMAGE} AS build
RUN apt-get update && apt-get install -y --no-install-recommends libclang-dev clang g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin switchyard

FROM ${RUNTIME_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libstdc++6 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/switchyard switchyard \
    && mkdir -p /var/lib/switchyard/state /etc/switchyard \
    && chown -R switchyard /var/lib/switchyard
COPY --from=build /src/target/release/switchyard /usr/local/bin/switchyard
COPY config/switchyard.toml /etc/switchyard/switchyard.toml
USER switchyard
WORKDIR /var/lib/switchyard
# RocksDB checkpoints (config `[state] dir = "state"`, relative to the working directory):
# keep this volume across restarts, or the moving tenants are copied again.
VOLUME ["/var/lib/switchyard/state"]
ENV SWITCHYARD_CONFIG=/etc/switchyard/switchyard.toml
# /metrics, /healthz, /readyz (set `[metrics] listen = "0.0.0.0:9187"` to scrape from outside).
EXPOSE 9187
# `switchyard health` asks the daemon's /healthz on `[metrics] listen`; no curl in the image.
HEALTHCHECK --interval=15s --timeout=7s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/switchyard", "health"]
# SIGTERM: finish the in-flight target transaction, checkpoint, confirm, exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/switchyard"]
CMD ["run"]
