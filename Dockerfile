# The daemon's image: built in a Rust image, run as a non-root user in a slim Debian one
# (glibc and zlib, which librdkafka links; nothing else).
#
#   docker build -t commerce-events .
#   docker compose up -d          # two replicas against three brokers, MySQL and Redis
#
# The SQL is checked at build time against the committed .sqlx/ data, so the build needs no
# database.

FROM rust:1.95-bookworm AS build
# rdkafka-sys builds librdkafka from source (configure, make and a C compiler, all in this
# image) and links the system zlib.
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY vendor vendor
COPY .cargo .cargo
COPY .sqlx .sqlx
COPY migrations migrations
COPY static static
COPY src src
# The workspace's other members (the test kit, the benchmarks) are named by Cargo.toml, so
# their manifests must be there; only the daemon's package is built.
COPY testkit testkit
COPY bench bench
ENV SQLX_OFFLINE=true
RUN cargo build --release --locked -p commerce-events --bin commerce-events \
 && strip target/release/commerce-events

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin commerce-events
COPY --from=build /src/target/release/commerce-events /usr/local/bin/commerce-events
USER 10001
# Listen beyond loopback inside the container; everything else comes from APP_… variables.
ENV APP_HTTP__HOST=0.0.0.0 \
    APP_HTTP__PORT=8080 \
    APP_LOG__FORMAT=json
EXPOSE 8080
# Healthy once /readyz answers 200: MySQL, Redis and Kafka answer and partitions are assigned.
HEALTHCHECK --interval=5s --timeout=4s --start-period=30s --retries=3 \
  CMD ["commerce-events", "ready"]
ENTRYPOINT ["commerce-events"]
CMD ["serve"]
