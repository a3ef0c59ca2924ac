//! The Unix-socket edge shared by the workload and admin sockets.

mod authority;

pub use authority::{AuthorityFix, MAX_HEADER_BLOCK, MAX_HEADER_LIST};

use tokio::net::{UnixListener, UnixStream};
use tokio_stream::{Stream, StreamExt, wrappers::UnixListenerStream};

/// Accepted connections, each behind the `:authority` fix so every gRPC
/// transport (grpc-go, grpc-core, grpc-java, tonic) can call the socket.
pub fn incoming(
    listener: UnixListener,
) -> impl Stream<Item = std::io::Result<AuthorityFix<UnixStream>>> {
    UnixListenerStream::new(listener).map(|accepted| accepted.map(AuthorityFix::new))
}
