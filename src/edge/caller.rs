//! Who is calling on a Unix socket, for the audit log.

tokio::task_local! {
    /// Who is calling on a Unix socket: `uid=U pid=P` from its peer
    /// credentials, set around each call by [`PeerCallerLayer`].
    static CALLER: String;
}

/// The caller of the request being handled, as `uid=U pid=P` (or
/// `unknown` outside a call).
pub fn peer_caller() -> String {
    CALLER
        .try_with(Clone::clone)
        .unwrap_or_else(|_| "unknown".into())
}

/// Names each call's caller (for the audit log) from the peer credentials
/// of its Unix socket connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerCallerLayer;

impl<S> tower::Layer<S> for PeerCallerLayer {
    type Service = PeerCaller<S>;
    fn layer(&self, inner: S) -> Self::Service {
        PeerCaller { inner }
    }
}

/// See [`PeerCallerLayer`].
#[derive(Debug, Clone)]
pub struct PeerCaller<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for PeerCaller<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let caller = req
            .extensions()
            .get::<super::UnixConnInfo>()
            .and_then(|i| i.uds.peer_cred)
            .map_or_else(
                || "unknown".to_string(),
                |c| match c.pid() {
                    Some(pid) => format!("uid={} pid={pid}", c.uid()),
                    None => format!("uid={}", c.uid()),
                },
            );
        Box::pin(CALLER.scope(caller, self.inner.call(req)))
    }
}

/// Runs `f` (e.g. a task spawned for a stream) as the current caller's, so
/// its audit records name them too.
pub fn as_caller<F: std::future::Future>(f: F) -> impl std::future::Future<Output = F::Output> {
    CALLER.scope(peer_caller(), f)
}

/// Runs `f` as `caller`'s: for work done after the call returned, such as a
/// response stream polled by its connection.
pub fn with_caller<R>(caller: String, f: impl FnOnce() -> R) -> R {
    CALLER.sync_scope(caller, f)
}
