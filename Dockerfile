# Multi-stage build: the RocksDB C++ build needs clang and g++ only in the builder.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libclang-dev clang g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin switchyard

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libstdc++6 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/switchyard switchyard \
    && mkdir -p /var/lib/switchyard/state /etc/switchyard \
    && chown -R switchyard /var/lib/switchyard
COPY --from=build /src/target/release/switchyard /usr/local/bin/switchyard
COPY config/switchyard.toml /etc/switchyard/switchyard.toml
USER switchyard
WORKDIR /var/lib/switchyard
VOLUME ["/var/lib/switchyard/state"]
ENV SWITCHYARD_CONFIG=/etc/switchyard/switchyard.toml
ENTRYPOINT ["/usr/local/bin/switchyard"]
CMD ["check"]
