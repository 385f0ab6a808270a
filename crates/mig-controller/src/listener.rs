//! The HTTP listener, with the limits an exposed endpoint needs: a cap on open connections overall
//! and per client address (a connection over either is closed at once), and a time limit for a
//! request's headers (a half-sent request, or an idle keep-alive connection, does not hold a slot
//! for long). Each connection is served by hyper's HTTP/1 server with axum's router as the service.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// Connection limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Open connections at most from one client address.
    pub max_connections_per_client: usize,
    /// A request's headers must arrive within this (idle keep-alive connections included).
    pub header_read_timeout: Duration,
}

/// Counts connections per client address; a slot is given back when its guard drops.
#[derive(Clone, Default)]
struct PerClient(Arc<Mutex<HashMap<IpAddr, usize>>>);

struct Slot {
    clients: PerClient,
    ip: IpAddr,
}

impl PerClient {
    fn take(&self, ip: IpAddr, max: usize) -> Option<Slot> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            clients: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.clients.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Serve `app` on `listener` until `shutdown` turns true; `refused` is called for each connection
/// closed at once for a limit (`"total"` or `"per-client"`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
    refused: impl Fn(&'static str) + Send + 'static,
) {
    let stop = stopped(shutdown.clone());
    tokio::pin!(stop);
    let total = Arc::new(Semaphore::new(limits.max_connections));
    let clients = PerClient::default();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        while connections.try_join_next().is_some() {}
        let Ok(permit) = total.clone().try_acquire_owned() else {
            refused("total");
            continue; // dropping the stream closes it
        };
        let Some(slot) = clients.take(peer.ip(), limits.max_connections_per_client) else {
            refused("per-client");
            continue;
        };
        let app = app.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _held = (permit, slot);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
            tokio::pin!(conn);
            let stopping = tokio::select! {
                _ = conn.as_mut() => false,
                _ = stopped(shutdown) => true,
            };
            if stopping {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
            }
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

/// Resolves once `rx` says true (or its sender is gone).
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
