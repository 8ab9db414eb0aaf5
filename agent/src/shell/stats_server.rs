//! The stats port: on each connection, write the latest stats JSON document and close.
//!
//! The capture thread publishes a rendered document into a [`StatsSnapshot`] about once a
//! second; the server only reads it, so the hot path never waits on a client.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// The latest stats document, shared between the capture thread and the server.
#[derive(Debug, Clone, Default)]
pub struct StatsSnapshot(Arc<Mutex<Arc<String>>>);

impl StatsSnapshot {
    /// Replaces the document.
    pub fn publish(&self, document: String) {
        if let Ok(mut current) = self.0.lock() {
            *current = Arc::new(document);
        }
    }

    /// The current document.
    pub fn current(&self) -> Arc<String> {
        self.0.lock().map(|d| Arc::clone(&d)).unwrap_or_default()
    }

    /// Resolves once a first document has been published.
    pub async fn first_published(&self) {
        while self.current().is_empty() {
            tokio::time::sleep(FIRST_DOCUMENT_POLL).await;
        }
    }
}

/// Clients served at once at most; others wait in the listen backlog.
const MAX_CLIENTS: usize = 64;
/// A client that does not take its document within this time is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a server that has no document yet looks again.
const FIRST_DOCUMENT_POLL: Duration = Duration::from_millis(5);

/// Serves `snapshot` on `listener` until `shutdown` resolves. Clients that come before the
/// first document is published (the agent still starting) wait in the listen backlog for it:
/// no client is ever sent an empty document.
pub async fn serve(
    listener: TcpListener,
    snapshot: StatsSnapshot,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    tokio::select! {
        () = &mut shutdown => return,
        () = snapshot.first_published() => {}
    }
    tcpkit_ops::listener::serve_clients(
        listener,
        MAX_CLIENTS,
        WRITE_TIMEOUT,
        shutdown,
        |mut socket| {
            let document = snapshot.current();
            async move {
                let write = async {
                    socket.write_all(document.as_bytes()).await?;
                    socket.write_all(b"\n").await?;
                    socket.shutdown().await
                };
                let _ = write.await;
            }
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::AsyncReadExt;

    /// Runs `clients` against a server of `snapshot` on a free port, then stops the server
    /// (within 5 s).
    fn with_server<F: std::future::Future<Output = ()>>(
        snapshot: StatsSnapshot,
        clients: impl FnOnce(SocketAddr) -> F,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(serve(listener, snapshot, async {
                let _ = stopped.await;
            }));
            clients(addr).await;
            stop.send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(5), server)
                .await
                .expect("stopped")
                .unwrap();
        });
    }

    async fn document(addr: SocketAddr) -> String {
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut got = String::new();
        client.read_to_string(&mut got).await.unwrap();
        got
    }

    #[test]
    fn each_client_gets_the_latest_document() {
        let snapshot = StatsSnapshot::default();
        snapshot.publish("[1]".into());
        with_server(snapshot.clone(), |addr| async move {
            for expected in ["[1]\n", "[2]\n"] {
                assert_eq!(document(addr).await, expected);
                snapshot.publish("[2]".into());
            }
        });
    }

    #[test]
    fn a_client_before_the_first_document_waits_for_it() {
        let snapshot = StatsSnapshot::default();
        with_server(snapshot.clone(), |addr| async move {
            let client = tokio::spawn(document(addr));
            tokio::time::sleep(Duration::from_millis(50)).await;
            snapshot.publish("[0]".into());
            assert_eq!(client.await.unwrap(), "[0]\n");
        });
    }

    #[test]
    fn a_server_without_a_document_still_stops() {
        with_server(StatsSnapshot::default(), |_| async {});
    }
}
