//! The socket edge: every listening socket accepts through a loop with limits
//! (connections overall and per peer, a first-request or handshake deadline,
//! back-off on `EMFILE`), and Unix sockets add the `:authority` layer so every
//! gRPC transport (grpc-go, grpc-core, grpc-java, tonic) can call them.

mod accept;
mod authority;

pub use accept::{Admitted, ConnLimits, raise_fd_limit};
pub use authority::{AuthorityFix, MAX_HEADER_BLOCK, MAX_HEADER_LIST};

use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use accept::{AcceptBackoff, Limiter};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// Accepted Unix-socket connections under `limits` (per peer = per uid), each
/// behind the `:authority` layer. `name` labels logs.
pub fn unix_incoming(
    name: &'static str,
    listener: UnixListener,
    limits: ConnLimits,
) -> ReceiverStream<io::Result<Admitted<AuthorityFix<UnixStream>>>> {
    let (tx, rx) = mpsc::channel(64);
    let limiter = Limiter::new(name, &limits);
    tokio::spawn(async move {
        let mut backoff = AcceptBackoff::new(name);
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => return,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    backoff.wait(&e).await;
                    continue;
                }
            };
            backoff.reset();
            let uid = stream.peer_cred().map_or(u32::MAX, |c| c.uid());
            let Some(slot) = limiter.admit(uid) else {
                continue;
            };
            let conn =
                AuthorityFix::new(stream).with_first_request_timeout(limits.first_request_timeout);
            if tx.send(Ok(Admitted::new(conn, slot))).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Accepted TCP connections under `limits` (per peer = per IP address), with
/// TCP_NODELAY and keepalive, each TLS handshake bounded by the limits'
/// deadline. Handshakes run concurrently, so a slow peer delays no one else.
pub fn tls_incoming(
    name: &'static str,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: ConnLimits,
) -> ReceiverStream<io::Result<Admitted<TlsStream<TcpStream>>>> {
    let (tx, rx) = mpsc::channel(64);
    let limiter: Arc<Limiter<IpAddr>> = Limiter::new(name, &limits);
    tokio::spawn(async move {
        let mut backoff = AcceptBackoff::new(name);
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    backoff.wait(&e).await;
                    continue;
                }
            };
            backoff.reset();
            let Some(slot) = limiter.admit(peer.ip()) else {
                continue;
            };
            // Without TCP_NODELAY, Nagle plus delayed ACKs stall responses ~40 ms.
            let _ = stream.set_nodelay(true);
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(ConnLimits::KEEPALIVE_INTERVAL)
                .with_interval(ConnLimits::KEEPALIVE_TIMEOUT);
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(limits.first_request_timeout, acceptor.accept(stream))
                    .await
                {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(Admitted::new(tls, slot))).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(socket = name, %peer, error = %e, "TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(socket = name, %peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
