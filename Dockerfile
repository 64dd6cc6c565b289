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
# The dashboard's checked-in build, embedded in the binary (no npm step here).
COPY web/dist ./web/dist

# The commit GET /v1/version reports: docker build --build-arg STRATA_GIT_COMMIT=$(git rev-parse HEAD)
ARG STRATA_GIT_COMMIT=""
ENV STRATA_GIT_COMMIT=${STRATA_GIT_COMMIT}
RUN cargo build --release --locked --bin strata \
    && install -m 0755 target/release/strata /usr/local/bin/strata

# --- runtime -----------------------------------------------------------------------
FROM debian:bookworm-slim

# qemu-img does every file operation; curl is the compose healthcheck's probe of
# /readyz. SQLite is compiled into the binary.
RUN apt-get update \
    && apt-get install -y --no-install-recommends qemu-utils curl ca-certificates \
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

# Ready once the jobs a crash interrupted are finished or rolled back (503 until then).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8080/readyz"]
ENTRYPOINT ["strata"]
CMD ["serve", "--listen", "0.0.0.0:8080", "--data-dir", "/var/lib/strata"]
