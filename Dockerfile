# mcp-worker: built in a Rust image, run from a slim Debian image as an unprivileged user.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src src
COPY config config
COPY migrations migrations
# Workspace members: cargo needs them to load the workspace, though the image never runs them.
COPY tests/oauth_server tests/oauth_server
COPY bench/Cargo.toml bench/Cargo.toml
COPY bench/src bench/src
RUN cargo build --release --locked --bin mcp-worker

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/mcp-worker /usr/local/bin/mcp-worker
USER 65532
ENTRYPOINT ["mcp-worker"]
CMD ["run"]
