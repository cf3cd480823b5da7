# retune: the server and the trainer sidecar in one slim image.
#   docker build -t retune:dev .          (podman/buildah take the same file)
# Build stage: the workspace in release (x86-64-v3, as .cargo/config sets; the
# binary refuses an older CPU with a clear message).
FROM rust:1.95-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ make pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p retune-server --bin retune -p retune-trainer --bin retune-trainer \
    && strip target/release/retune target/release/retune-trainer

# Runtime: Debian slim, the two binaries, a non-root user. Nothing is written
# outside /var/lib/retune (the data volume) and /tmp (an emptyDir): it runs
# with a read-only root filesystem.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 retune \
    && useradd --system --uid 10001 --gid retune --home-dir /var/lib/retune --shell /usr/sbin/nologin retune \
    && mkdir -p /var/lib/retune /models /etc/retune && chown retune:retune /var/lib/retune
COPY --from=build /src/target/release/retune /src/target/release/retune-trainer /usr/local/bin/
USER 10001:10001
ENV RETUNE_CACHE=/var/lib/retune/cache
EXPOSE 8080
VOLUME ["/var/lib/retune"]
ENTRYPOINT ["/usr/local/bin/retune"]
CMD ["serve", "--config", "/etc/retune/retune.toml"]
