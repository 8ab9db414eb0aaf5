//! Bad input over the wire to a real aggregator (127.0.0.1:0, SQLite in a temp dir): bytes
//! that are not protobuf, a message over the size limit, a stream that does not start with a
//! hello, HTTP/1 and garbage on the gRPC port. Each gets a clear status or a closed
//! connection, is counted, and the aggregator goes on serving well-behaved agents.

use std::io::{Read, Write};

use bytes::{Buf, BufMut};
use prost::Message;
use tcpkit_aggregator::metrics::Telemetry;
use tcpkit_aggregator::server::{self, Config, Limits};
use tcpkit_proto::v1::{self, agent_message::Body};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Code, Status};

/// Sends raw bytes as gRPC messages; reads replies as raw bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

/// Opens an Ingest stream, sends `messages` as they are, and returns how the stream ended.
async fn raw_stream(url: &str, messages: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, Status> {
    raw_stream_from(url, tokio_stream::iter(messages)).await
}

/// [`raw_stream`] with the messages from a stream that may stay open.
async fn raw_stream_from(
    url: &str,
    outbound: impl tokio_stream::Stream<Item = Vec<u8>> + Send + 'static,
) -> Result<Vec<Vec<u8>>, Status> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX);
    grpc.ready().await.unwrap();
    let replies = grpc
        .streaming(
            tonic::Request::new(outbound),
            PathAndQuery::from_static("/tcpkit.v1.Ingest/Stream"),
            Raw,
        )
        .await?;
    let mut inbound = replies.into_inner();
    let mut got = Vec::new();
    while let Some(reply) = inbound.message().await? {
        got.push(reply);
    }
    Ok(got)
}

fn hello(session: u64) -> Vec<u8> {
    hello_of("wire", session)
}

fn hello_of(agent_id: &str, session: u64) -> Vec<u8> {
    v1::AgentMessage {
        body: Some(Body::Hello(v1::Hello {
            agent_id: agent_id.into(),
            session,
            ..Default::default()
        })),
    }
    .encode_to_vec()
}

/// A batch of one event, changed by `change`.
fn batch_where(seq: u64, change: impl FnOnce(&mut v1::Event)) -> Vec<u8> {
    let mut message = v1::AgentMessage::decode(batch(seq, 1, 10).as_slice()).unwrap();
    if let Some(Body::Batch(b)) = &mut message.body {
        change(&mut b.events[0]);
    }
    message.encode_to_vec()
}

fn batch(seq: u64, events: usize, summary_len: usize) -> Vec<u8> {
    let event = v1::Event {
        ts_us: 1_700_000_000_000_000,
        client: "10.0.0.1:40000".into(),
        server: "10.0.0.2".into(),
        port: 6379,
        proto: "redis".into(),
        command: "GET".into(),
        summary: "x".repeat(summary_len),
        latency_us: 1000,
        ..Default::default()
    };
    v1::AgentMessage {
        body: Some(Body::Batch(v1::Batch {
            seq,
            events: vec![event; events],
            ..Default::default()
        })),
    }
    .encode_to_vec()
}

#[test]
fn bad_messages_get_clear_statuses_and_the_aggregator_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let url = format!("http://{addr}");
        let config = Config {
            store: tcpkit_aggregator::store::Spec::Sqlite(dir.path().join("wire.db")),
            retention: None,
            max_db_bytes: None,
            limits: Limits {
                max_message_bytes: 64 << 10,
                ..Limits::default()
            },
            token: None,
            tls: None,
        };
        let telemetry = std::sync::Arc::new(Telemetry::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(server::serve(listener, config, telemetry.clone(), async {
            let _ = stopped.await;
        }));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;

        // Not protobuf at all.
        let garbage: Vec<u8> = (0..4000u32)
            .map(|i| (i * 7919 % 251) as u8 | 0x80)
            .collect();
        let status = raw_stream(&url, vec![garbage]).await.unwrap_err();
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        assert!(status.message().contains("decode"), "{status:?}");

        // Over the size limit (64 KiB here): refused before it is decoded.
        let status = raw_stream(&url, vec![hello(1), batch(1, 100, 1000)])
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        assert!(
            status.message().contains("message length too large"),
            "{status:?}"
        );

        // Well-formed protobuf, wrong conversation: a batch before the hello, a second
        // hello, a batch whose summary is over the text cap.
        for (messages, says) in [
            (vec![batch(1, 1, 10)], "the first message must be a hello"),
            (vec![hello(2), hello(2)], "a second hello"),
            (vec![hello(3), batch(1, 1, 5000)], "bad batch"),
            (
                vec![hello_of("evil\u{1b}[2J", 5)],
                "bad hello: agent id holds the control",
            ),
            (
                vec![hello(6), batch_where(1, |e| e.ts_us = u64::MAX)],
                "bad batch: event time 18446744073709551615",
            ),
            (
                vec![hello(7), batch_where(1, |e| e.latency_us = u64::MAX)],
                "bad batch: latency",
            ),
        ] {
            let status = raw_stream(&url, messages).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(status.message().contains(says), "{status:?}");
        }

        // Not even HTTP/2: HTTP/1 and noise on the port, the connection is just closed.
        for noise in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            &[0xffu8; 3000][..],
        ] {
            let mut socket = std::net::TcpStream::connect(addr).unwrap();
            socket
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let _ = socket.write_all(noise);
            let mut answer = Vec::new();
            let _ = socket.read_to_end(&mut answer);
        }

        // And a well-behaved agent is served as before.
        let acks = raw_stream(&url, vec![hello(4), batch(1, 10, 20), batch(2, 10, 20)])
            .await
            .unwrap();
        let acks: Vec<v1::Ack> = acks
            .iter()
            .map(|a| v1::Ack::decode(a.as_slice()).unwrap())
            .collect();
        assert_eq!(
            acks.last().map(|a| (a.session, a.seq)),
            Some((4, 2)),
            "{acks:?}"
        );
        let page = telemetry.render();
        assert!(
            page.contains("tcpkit_aggregator_batches_total{outcome=\"invalid\"} 4"),
            "{page}"
        );

        // Queries with times past what can be stored are refused, not taken as "everything".
        let mut query = v1::query_client::QueryClient::connect(url.clone())
            .await
            .unwrap();
        let status = query
            .hist(v1::HistRequest {
                filter: Some(v1::Filter {
                    from_us: u64::MAX,
                    ..Default::default()
                }),
                by: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("bad filter"), "{status:?}");

        // An agent whose stream is open shows as connected, and not once it is closed.
        let (open_tx, open_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        open_tx.send(hello_of("held-open", 8)).await.unwrap();
        let held = tokio::spawn({
            let url = url.clone();
            async move {
                raw_stream_from(&url, tokio_stream::wrappers::ReceiverStream::new(open_rx)).await
            }
        });
        let connected = |agents: Vec<v1::AgentInfo>| {
            agents
                .iter()
                .find(|a| a.id == "held-open")
                .map(|a| a.connected)
        };
        let mut seen = None;
        for _ in 0..50 {
            let agents = query
                .agents(v1::AgentsRequest {})
                .await
                .unwrap()
                .into_inner()
                .agents;
            seen = connected(agents);
            if seen == Some(true) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(seen, Some(true));
        drop(open_tx);
        held.await.unwrap().unwrap();
        let agents = query
            .agents(v1::AgentsRequest {})
            .await
            .unwrap()
            .into_inner()
            .agents;
        assert_eq!(connected(agents), Some(false));
        assert!(
            page.contains("tcpkit_aggregator_stored_total{kind=\"events\"} 20"),
            "{page}"
        );
        assert!(
            page.contains("tcpkit_build_info{program=\"tcpkit-aggregator\",version=\""),
            "{page}"
        );

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    });
}
