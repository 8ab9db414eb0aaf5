//! How agents and `tcpkit-query` reach the aggregator: the address, TLS (a CA to trust, an
//! optional client certificate for mutual TLS) and the shared bearer token sent on every call.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::v1::{ingest_client::IngestClient, query_client::QueryClient};

/// The security flags every client of the aggregator takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientFlags {
    /// File holding the aggregator's shared token (sent as a bearer token on every call)
    #[arg(long = "token-file", global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for the aggregator's TLS; needs an https:// address
    #[arg(long = "tls-ca", global = true, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS, with --tls-key
    #[arg(
        long = "tls-cert",
        global = true,
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert
    #[arg(
        long = "tls-key",
        global = true,
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
}

/// Reads a token file: one line of visible ASCII, surrounding white space ignored.
pub fn read_token_file(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        bail!("the token file {} is empty", path.display());
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        bail!(
            "the token file {} must hold one word of visible ASCII characters",
            path.display()
        );
    }
    Ok(token.to_owned())
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read the {what} {}", path.display()))?;
    if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
        bail!("the {what} {} is not PEM", path.display());
    }
    Ok(pem)
}

/// Adds `authorization: Bearer <token>` to every call, when there is a token.
#[derive(Debug, Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// A client channel with its token.
pub type Authorized = InterceptedService<Channel, BearerToken>;

/// Everything needed to open a connection to the aggregator, checked up front.
#[derive(Debug, Clone)]
pub struct Connector {
    endpoint: Endpoint,
    token: BearerToken,
}

impl Connector {
    /// Checks the address and reads the token and certificates.
    pub fn new(url: &str, flags: &ClientFlags, connect_timeout: Duration) -> Result<Self> {
        check_address(url)?;
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .with_context(|| format!("bad aggregator address '{url}'"))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true);
        let https = url.starts_with("https://");
        match (&flags.tls_ca, https) {
            (Some(ca), true) => {
                let mut tls = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(read_pem(ca, "CA certificate")?));
                if let (Some(cert), Some(key)) = (&flags.tls_cert, &flags.tls_key) {
                    tls = tls.identity(Identity::from_pem(
                        read_pem(cert, "client certificate")?,
                        read_pem(key, "client key")?,
                    ));
                }
                endpoint = endpoint
                    .tls_config(tls)
                    .context("cannot set up TLS to the aggregator")?;
            }
            (None, true) => bail!("an https:// aggregator needs --tls-ca (the CA that signed it)"),
            (Some(_), false) => bail!("--tls-ca needs an https:// aggregator address, not '{url}'"),
            (None, false) if flags.tls_cert.is_some() => {
                bail!("--tls-cert needs an https:// aggregator address and --tls-ca")
            }
            (None, false) => {}
        }
        let token = match &flags.token_file {
            Some(path) => {
                let token = read_token_file(path)?;
                let value = MetadataValue::try_from(format!("Bearer {token}"))
                    .context("the token cannot be sent in a header")?;
                BearerToken(Some(value))
            }
            None => BearerToken(None),
        };
        Ok(Self { endpoint, token })
    }

    /// The address, as given.
    pub fn uri(&self) -> &tonic::codegen::http::Uri {
        self.endpoint.uri()
    }

    async fn channel(&self) -> Result<Authorized, tonic::transport::Error> {
        let channel = self.endpoint.connect().await?;
        Ok(InterceptedService::new(channel, self.token.clone()))
    }

    /// Connects the agents' service.
    pub async fn ingest(&self) -> Result<IngestClient<Authorized>, tonic::transport::Error> {
        Ok(IngestClient::new(self.channel().await?))
    }

    /// Connects the query service.
    pub async fn query(&self) -> Result<QueryClient<Authorized>, tonic::transport::Error> {
        Ok(QueryClient::new(self.channel().await?))
    }
}

/// An error with its causes, `outer: inner: root`, without repeats.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A failed call in words: the status message, its causes, and what to check for the
/// usual TLS and token mistakes.
pub fn describe_status(status: &tonic::Status) -> String {
    let mut text = status.message().to_owned();
    if let Some(source) = std::error::Error::source(status) {
        let causes = error_chain(source);
        text = if causes.starts_with(&text) {
            causes
        } else if text.ends_with(&causes) {
            text
        } else {
            format!("{text}: {causes}")
        };
    }
    with_hint(text, status.code() == tonic::Code::Unauthenticated)
}

/// `text`, with what to check when it is one of the usual TLS and token mistakes.
pub fn with_hint(text: String, unauthenticated: bool) -> String {
    let hint = if text.contains("CertificateRequired") {
        "the aggregator wants a client certificate: --tls-cert and --tls-key"
    } else if text.contains("UnknownIssuer") || text.contains("invalid peer certificate") {
        "the aggregator's certificate is not signed by the --tls-ca given"
    } else if text.contains("frame with invalid size") || text.contains("InvalidContentType") {
        "TLS on one side only? https:// and --tls-ca for a TLS aggregator, http:// otherwise"
    } else if text.contains("broken pipe")
        || text.contains("connection closed")
        || text.contains("operation was canceled")
    {
        "the aggregator closed the connection: does it want TLS (https://, --tls-ca) or a client certificate (--tls-cert, --tls-key)? Its log says why"
    } else if unauthenticated {
        "check --token-file: the aggregator's token is needed"
    } else {
        return text;
    };
    format!("{text} ({hint})")
}

/// Refuses an aggregator address without its scheme or port (`127.0.0.1:50051`,
/// `localhost`), which would otherwise be retried forever, with an example of the right form.
pub fn check_address(url: &str) -> Result<()> {
    let example = "like http://127.0.0.1:50051, or https://aggregator.example:50051 with --tls-ca";
    let Some((scheme, rest)) = url.split_once("://") else {
        bail!("bad aggregator address '{url}': give its scheme and port, {example}");
    };
    if scheme != "http" && scheme != "https" {
        bail!("bad aggregator address '{url}': the scheme is http or https, {example}");
    }
    let authority = rest.split('/').next().unwrap_or_default();
    let port = authority
        .rsplit_once(':')
        .map(|(host, port)| (host, port.parse::<u16>()));
    match port {
        Some((host, Ok(port))) if !host.is_empty() && port != 0 => Ok(()),
        _ => bail!("bad aggregator address '{url}': give its host and port, {example}"),
    }
}
