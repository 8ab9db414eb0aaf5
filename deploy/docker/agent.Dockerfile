# The tcpkit agent. Build from the repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t tcpkit-agent .
# Run with the host's network and the two capabilities capture needs:
#   docker run --network host --cap-drop ALL --cap-add NET_RAW --cap-add NET_ADMIN \
#     tcpkit-agent -i any -p 6379 -m redis -t 10
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libpcap-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tcpkit

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libpcap0.8 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/tcpkit /usr/local/bin/tcpkit
COPY deploy/config/agent.toml /etc/tcpkit/agent.toml
# Capture opens as root (with only NET_RAW and NET_ADMIN), then the agent becomes nobody.
ENTRYPOINT ["/usr/local/bin/tcpkit", "--user", "nobody"]
CMD ["--help"]
