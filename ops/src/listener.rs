//! The accept loop of the small TCP servers (the stats port, the metrics endpoint): a cap on
//! clients served at once (others wait in the listen backlog), a time limit per client, and
//! a clean stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// Hands each client of `listener` to `serve`, at most `max_clients` at once and each for at
/// most `timeout`, until `shutdown` resolves.
pub async fn serve_clients<F, Fut>(
    listener: TcpListener,
    max_clients: usize,
    timeout: Duration,
    shutdown: impl Future<Output = ()>,
    serve: F,
) where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(tokio::sync::Semaphore::new(max_clients));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((socket, _)) = accepted else {
            continue;
        };
        let client = serve(socket);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(timeout, client).await;
            drop(permit);
        });
    }
}
