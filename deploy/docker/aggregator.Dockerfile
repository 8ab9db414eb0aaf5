# The tcpkit aggregator and tcpkit-query. Build from the repository root:
#   docker build -f deploy/docker/aggregator.Dockerfile -t tcpkit-aggregator .
#   docker run -p 50051:50051 -v tcpkit-data:/var/lib/tcpkit tcpkit-aggregator
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tcpkit-aggregator --bin tcpkit-query

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/tcpkit tcpkit \
    && install -d -o tcpkit -g tcpkit -m 0700 /var/lib/tcpkit
COPY --from=build /src/target/release/tcpkit-aggregator /src/target/release/tcpkit-query /usr/local/bin/
USER tcpkit
WORKDIR /var/lib/tcpkit
VOLUME ["/var/lib/tcpkit"]
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/tcpkit-aggregator"]
CMD ["--listen", "0.0.0.0:50051", "--db", "/var/lib/tcpkit/tcpkit.db", "--retention", "7d"]
