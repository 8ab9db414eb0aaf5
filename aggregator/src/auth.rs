//! Who may call the aggregator: a shared bearer token, checked by a tower layer in front of
//! both services, and TLS (optionally mutual) settings for the listener.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// The token check: with a token set, every call must carry `authorization: Bearer <token>`;
/// without one, every call passes.
#[derive(Debug, Clone)]
pub struct TokenCheck {
    expected: Option<Arc<[u8]>>,
    refused: Arc<AtomicU64>,
}

impl TokenCheck {
    /// Checks calls against `token` (if any), counting refusals in `refused`.
    pub fn new(token: Option<&str>, refused: Arc<AtomicU64>) -> Self {
        Self {
            expected: token.map(|t| format!("Bearer {t}").into_bytes().into()),
            refused,
        }
    }
}

/// Equal, in a time that depends only on the lengths.
pub(crate) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let reason = match request.metadata().get("authorization") {
            Some(given) if same_bytes(given.as_bytes(), expected) => return Ok(request),
            Some(_) => "a wrong token",
            None => "no token",
        };
        self.refused.fetch_add(1, Ordering::Relaxed);
        let peer = request
            .remote_addr()
            .map_or_else(|| "an unknown peer".to_owned(), |a| a.to_string());
        tracing::warn!("refused a call from {peer}: {reason}");
        Err(Status::unauthenticated(format!(
            "refused: {reason} (see --token-file)"
        )))
    }
}

/// The listener's TLS files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Reads the files into a TLS configuration.
    pub fn load(&self) -> Result<ServerTlsConfig> {
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path)
                .with_context(|| format!("cannot read the {what} {}", path.display()))
        };
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
            read(&self.cert, "TLS certificate")?,
            read(&self.key, "TLS key")?,
        ));
        if let Some(ca) = &self.client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
        }
        Ok(tls)
    }

    /// The same files as a rustls configuration, for the web listener (HTTP/1.1).
    pub fn rustls(&self) -> Result<Arc<rustls::ServerConfig>> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
            .with_context(|| format!("cannot read the TLS certificate {}", self.cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .with_context(|| format!("cannot read the TLS key {}", self.key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca)
                    .with_context(|| format!("cannot read the client CA {}", ca.display()))?
                {
                    roots.add(c?)?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.into(),
                    provider,
                )
                .build()?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .context("bad TLS certificate or key")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn call(check: &mut TokenCheck, header: Option<&str>) -> Result<(), Status> {
        let mut request = Request::new(());
        if let Some(h) = header {
            request
                .metadata_mut()
                .insert("authorization", h.parse().unwrap());
        }
        check.call(request).map(drop)
    }

    #[test]
    fn only_the_right_token_passes_and_refusals_are_counted() {
        let refused = Arc::new(AtomicU64::new(0));
        let mut check = TokenCheck::new(Some("s3cret"), Arc::clone(&refused));
        let mut open = TokenCheck::new(None, Arc::clone(&refused));
        assert!(call(&mut open, None).is_ok());
        assert!(call(&mut check, Some("Bearer s3cret")).is_ok());
        for wrong in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3creT"),
            Some("s3cret"),
        ] {
            let status = call(&mut check, wrong).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
        }
        assert_eq!(refused.load(Ordering::Relaxed), 4);
    }
}
