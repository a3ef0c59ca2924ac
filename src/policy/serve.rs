//! Serving Envoy ext_authz from a process: the server, or an agent beside
//! its workloads. Both read the same config keys and run the same listener.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use super::{ExtAuthz, PolicyError, RemoteJwks, load_ca_file, watch_policies};
use crate::config::{ConfigError, RawConfig};
use crate::x509::Bundle;

/// Config keys (and, with `-` for `_`, flags) of the ext_authz endpoint.
pub const POLICY_KEYS: [&str; 4] = [
    "ext_authz_bind",
    "policy_dir",
    "policy_root_namespace",
    "jwks_ca_file",
];

/// Where ext_authz listens when only `policy_dir` is given (Envoy's usual ext_authz port).
pub const DEFAULT_EXT_AUTHZ_BIND: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9191);

/// Where and what to serve.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// The ext_authz gRPC address.
    pub ext_authz_bind: SocketAddr,
    /// Policy YAML directory (hot-reloaded).
    pub policy_dir: PathBuf,
    /// The mesh-wide root namespace.
    pub root_namespace: String,
    /// Extra CA certificates (DER) for `jwksUri` servers, beside the system's.
    pub jwks_roots: Vec<Vec<u8>>,
    /// Proxies in front of Envoy whose `X-Forwarded-For` entries are trusted
    /// for `remote.ip` (0: the peer is the client).
    pub trusted_proxies: usize,
}

impl PolicyConfig {
    /// Serves `policy_dir` on `ext_authz_bind` with the defaults.
    pub fn new(ext_authz_bind: SocketAddr, policy_dir: PathBuf) -> Self {
        PolicyConfig {
            ext_authz_bind,
            policy_dir,
            root_namespace: "istio-system".into(),
            jwks_roots: Vec::new(),
            trusted_proxies: 0,
        }
    }

    /// Reads the [`POLICY_KEYS`]: `None` when ext_authz is not configured.
    /// `policy_dir` turns it on (on `ext_authz_bind`, default
    /// [`DEFAULT_EXT_AUTHZ_BIND`]); the other keys need it.
    pub fn from_raw(raw: &RawConfig) -> Result<Option<Self>, ConfigError> {
        let bind = raw.parsed("ext_authz_bind", None, |v| {
            v.parse::<SocketAddr>()
                .map_err(|e| format!("{e} (expected IP:PORT, e.g. 127.0.0.1:9191)"))
        })?;
        let root_namespace = raw.get("policy_root_namespace")?;
        let jwks_roots = raw.parsed("jwks_ca_file", None, |path| load_ca_file(Path::new(path)))?;
        let trusted_proxies = raw.parsed("policy_trusted_proxies", None, |v| {
            v.parse::<usize>()
                .map_err(|_| "expected a number of proxy hops (0 or more)".to_string())
        })?;
        let Some(dir) = raw.get("policy_dir")?.map(PathBuf::from) else {
            let given = [
                ("ext_authz_bind", bind.is_some()),
                ("policy_root_namespace", root_namespace.is_some()),
                ("jwks_ca_file", jwks_roots.is_some()),
                ("policy_trusted_proxies", trusted_proxies.is_some()),
            ];
            return match given.iter().find(|(_, set)| *set) {
                Some((key, _)) => Err(ConfigError::Missing {
                    key: "policy_dir",
                    flag: format!("policy-dir (required with {key})"),
                }),
                None => Ok(None),
            };
        };
        Ok(Some(PolicyConfig {
            ext_authz_bind: bind.unwrap_or(DEFAULT_EXT_AUTHZ_BIND),
            policy_dir: dir,
            root_namespace: root_namespace.unwrap_or_else(|| "istio-system".into()),
            jwks_roots: jwks_roots.unwrap_or_default(),
            trusted_proxies: trusted_proxies.unwrap_or(0),
        }))
    }
}

/// Why the ext_authz endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The policy directory is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Remote JWKS fetching could not be set up.
    #[error("cannot set up jwksUri fetching: {0}")]
    Jwks(String),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

/// The running endpoint: await it to serve until shutdown.
pub type ServeFuture = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

/// Loads the policies (failing on a bad one), binds the listener and returns
/// its address and the serving future, which ends when `shutdown` turns
/// true. JWT rules without a JWKS use the latest value of `bundle`.
pub async fn serve_ext_authz(
    config: &PolicyConfig,
    bundle: watch::Receiver<Option<Bundle>>,
    shutdown: watch::Receiver<bool>,
) -> Result<(SocketAddr, ServeFuture), ServeError> {
    let jwks = RemoteJwks::new(&config.jwks_roots).map_err(ServeError::Jwks)?;
    let evaluator = watch_policies(
        config.policy_dir.clone(),
        config.root_namespace.clone(),
        bundle,
        Arc::new(jwks),
        shutdown.clone(),
    )
    .await?;
    let bind_error = |e: std::io::Error| ServeError::Bind {
        addr: config.ext_authz_bind,
        reason: e.to_string(),
    };
    let listener = TcpListener::bind(config.ext_authz_bind)
        .await
        .map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    let mut stop = shutdown;
    let serving = Server::builder()
        .add_service(AuthorizationServer::new(ExtAuthz::new(
            evaluator,
            config.trusted_proxies,
        )))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            },
        );
    tracing::info!(%addr, dir = %config.policy_dir.display(), "ext_authz ready");
    Ok((addr, Box::pin(serving)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&'static str, &str)]) -> Result<Option<PolicyConfig>, ConfigError> {
        let mut raw = RawConfig::default();
        for (k, v) in pairs {
            raw.flag(k, Some(v.to_string()));
        }
        PolicyConfig::from_raw(&raw)
    }

    #[test]
    fn policy_dir_turns_ext_authz_on_at_the_design_default() {
        assert!(config(&[]).unwrap().is_none());
        let c = config(&[("policy_dir", "/p")]).unwrap().unwrap();
        assert_eq!(c.ext_authz_bind.to_string(), "127.0.0.1:9191");
        assert_eq!(c.root_namespace, "istio-system");
        let c = config(&[("policy_dir", "/p"), ("ext_authz_bind", "127.0.0.1:0")])
            .unwrap()
            .unwrap();
        assert_eq!(c.ext_authz_bind.port(), 0);
        let e = config(&[("ext_authz_bind", "127.0.0.1:0")]).unwrap_err();
        assert!(e.to_string().contains("policy-dir"), "{e}");
        let e = config(&[("policy_dir", "/p"), ("ext_authz_bind", "nope")]).unwrap_err();
        assert!(e.to_string().contains("ext_authz_bind"), "{e}");
    }
}
