# routstr-node: multi-stage build. The build stage runs the same cargo commands as CI; the
# runtime image is Debian slim with the binary only, run as a non-root user, all state in /data.
#
#   docker build -t routstr-node .
#   docker run -p 8000:8000 -v routstr-data:/data --env-file .env routstr-node

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY vendor ./vendor
COPY src ./src
COPY relays.toml ./
COPY benches ./benches
COPY tests ./tests
COPY docs ./docs
# The demo (embedded test mint) stays in: `routstr-node demo` works inside the container too.
RUN cargo build --release --locked \
 && strip target/release/routstr-node

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin routstr \
 && mkdir -p /data && chown routstr /data && chmod 700 /data
COPY --from=build /src/target/release/routstr-node /usr/local/bin/routstr-node
USER routstr
ENV DATA_DIR=/data \
    HOST=0.0.0.0 \
    PORT=8000 \
    LOG_FORMAT=json \
    TOR_STATE_DIR=/data/tor
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8000/health || exit 1
# tini forwards SIGTERM, so `docker stop` lets the node drain and settle before it exits.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/routstr-node"]
STOPSIGNAL SIGTERM
