# strata: REST service for VM disks and snapshot trees on qcow2 files.
#
#   docker build -t strata .
#   docker run -p 8080:8080 -v strata-data:/var/lib/strata strata
#
# or `docker compose up --build` (docker-compose.yml).

# --- build -------------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src

# Only what the build needs. Copying these paths one by one also keeps target/ and
# data/ out of the build. `build.r[s]` matches build.rs if there is one and nothing
# otherwise.
COPY Cargo.toml Cargo.lock build.r[s] ./
COPY src ./src
COPY migrations ./migrations
COPY benches ./benches

RUN cargo build --release --locked --bin strata \
    && install -m 0755 target/release/strata /usr/local/bin/strata

# --- runtime -----------------------------------------------------------------------
FROM debian:bookworm-slim

# qemu-img does every file operation. SQLite is compiled into the binary.
RUN apt-get update \
    && apt-get install -y --no-install-recommends qemu-utils \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system strata \
    && useradd --system --gid strata --home-dir /var/lib/strata --no-create-home --shell /usr/sbin/nologin strata \
    && mkdir -p /var/lib/strata \
    && chown strata:strata /var/lib/strata

COPY --from=build /usr/local/bin/strata /usr/local/bin/strata

USER strata
WORKDIR /var/lib/strata
# The database (strata.db) and the image files (volumes/). Backing references between
# the files are relative, so this volume can be mounted anywhere.
VOLUME ["/var/lib/strata"]
EXPOSE 8080
ENV STRATA_LOG=info

# No HEALTHCHECK: the slim image has no HTTP client. Probe GET /readyz from outside.
ENTRYPOINT ["strata"]
CMD ["serve", "--listen", "0.0.0.0:8080", "--data-dir", "/var/lib/strata"]
