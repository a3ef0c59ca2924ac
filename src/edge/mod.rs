//! The socket edge: every listening socket accepts through a loop with limits
//! (connections overall and per peer, a first-request or handshake deadline,
//! back-off on `EMFILE`), and Unix sockets add the `:authority` layer so every
//! gRPC transport (grpc-go, grpc-core, grpc-java, tonic) can call them.

/// Forwards writes to the wrapped connection `io` of a read-side wrapper
/// (`$ty<IO>`).
macro_rules! forward_write {
    ($ty:ident) => {
        impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $ty<IO> {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.io.is_write_vectored()
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
            }
        }
    };
}

/// Forwards tonic's connection info to the wrapped connection `io`.
macro_rules! forward_connect_info {
    ($ty:ident) => {
        impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected
            for $ty<IO>
        {
            type ConnectInfo = IO::ConnectInfo;

            fn connect_info(&self) -> Self::ConnectInfo {
                self.io.connect_info()
            }
        }
    };
}

mod accept;
mod authority;
mod caller;
mod huffman;

pub use accept::{Admitted, ConnLimits, raise_fd_limit};
pub use authority::{AuthorityFix, MAX_HEADER_BLOCK, MAX_HEADER_LIST, UnixConnInfo};
pub use caller::{PeerCaller, PeerCallerLayer, as_caller, peer_caller, with_caller};

use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use accept::{AcceptBackoff, Limiter};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// Binds a Unix socket at `path` with `mode`, in a directory created with
/// `dir_mode` if missing and refused if another user could tamper with it. A
/// stale socket is replaced; anything else at `path` is never deleted.
pub fn bind_unix(path: &std::path::Path, mode: u32, dir_mode: u32) -> Result<UnixListener, String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::runtime::files::socket_dir(dir, dir_mode)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err("another process is already listening on this socket".into());
            }
            std::fs::remove_file(path).map_err(|e| format!("cannot remove stale socket: {e}"))?;
        }
        Ok(_) => {
            return Err("a file that is not a socket is in the way; refusing to replace it".into());
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.to_string()),
    }
    let listener = UnixListener::bind(path).map_err(|e| e.to_string())?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| e.to_string())?;
    Ok(listener)
}

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
/// Each connection gets the TLS configuration current when it arrives (the
/// server's certificate and trusted roots follow CA rotation).
pub fn tls_incoming(
    name: &'static str,
    listener: TcpListener,
    acceptor: tokio::sync::watch::Receiver<TlsAcceptor>,
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
            let (acceptor, tx) = (acceptor.borrow().clone(), tx.clone());
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn binding_never_deletes_a_file_and_checks_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("regular.txt");
        std::fs::write(&file, "keep me").unwrap();
        let e = bind_unix(&file, 0o777, 0o755).unwrap_err();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

        let sock = dir.path().join("public/api.sock");
        let l = bind_unix(&sock, 0o777, 0o755).unwrap();
        let e = bind_unix(&sock, 0o777, 0o755).unwrap_err();
        assert!(e.contains("already listening"), "{e}");
        drop(l);
        // A stale socket is replaced.
        bind_unix(&sock, 0o600, 0o755).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // A directory others can write to is refused (they could swap the socket).
        let open_dir = dir.path().join("open");
        std::fs::create_dir(&open_dir).unwrap();
        std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = bind_unix(&open_dir.join("api.sock"), 0o777, 0o755).unwrap_err();
        assert!(e.contains("writable by group or others"), "{e}");
        assert!(!open_dir.join("api.sock").exists());
    }
}
