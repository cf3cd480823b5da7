//! Connecting to PostgreSQL (the registry and the datasets store, when replicas
//! share them): a `postgres://` URL with libpq's TLS options, and the rustls
//! connector that carries them out.
//!
//! - `sslmode`: `disable` (the default when absent: plain TCP, as before TLS
//!   was supported), `prefer` (TLS when the server offers it), `require`,
//!   `verify-ca` or `verify-full` (TLS or no connection). Whenever TLS is
//!   used the server's certificate is verified, chain and host name, as
//!   libpq's `verify-full` does: `require` and `verify-ca` never accept a
//!   certificate that `verify-full` would refuse.
//! - `sslrootcert`: a PEM file of the CAs to trust (managed databases publish
//!   theirs), or `system` for the system's roots, which are also the default.
//!
//! Client certificates (`sslcert`, `sslkey`) are refused, naming the option.

use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A PostgreSQL URL that cannot be used, with the reason (the password is never
/// part of it).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PgUrlError(pub String);

/// Where and how to connect: the parsed URL, its TLS mode, and the connector
/// for it (pass both to `postgres`/`r2d2_postgres`).
pub struct PgTarget {
    pub config: postgres::Config,
    pub tls: PgTls,
    /// The URL's `sslmode` (`disable` when absent).
    pub sslmode: &'static str,
}

/// Parse `url` (`postgres://…` or `postgresql://…`) with its TLS options.
pub fn pg_target(url: &str) -> Result<PgTarget, PgUrlError> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut sslmode = "disable";
    let mut rootcert: Option<String> = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let value = decode(v)?;
        match k {
            "sslmode" => {
                sslmode = match value.as_str() {
                    "disable" => "disable",
                    "prefer" => "prefer",
                    "require" => "require",
                    "verify-ca" => "verify-ca",
                    "verify-full" => "verify-full",
                    other => {
                        return Err(PgUrlError(format!(
                            "sslmode={other} is not supported: use disable, prefer, require, verify-ca or verify-full"
                        )))
                    }
                }
            }
            "sslrootcert" => rootcert = Some(value),
            "sslcert" | "sslkey" | "sslpassword" | "sslcrl" | "sslcrldir" => {
                return Err(PgUrlError(format!(
                    "{k} is not supported (client certificates and revocation lists): authenticate with a password"
                )))
            }
            _ => rest.push(pair),
        }
    }
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    let mut config: postgres::Config = url
        .parse()
        .map_err(|e| PgUrlError(format!("not a PostgreSQL URL: {e}")))?;
    config.ssl_mode(match sslmode {
        "disable" => postgres::config::SslMode::Disable,
        "prefer" => postgres::config::SslMode::Prefer,
        _ => postgres::config::SslMode::Require,
    });
    let tls = match sslmode {
        "disable" => PgTls(None),
        _ => PgTls(Some(Arc::new(client_config(rootcert.as_deref())?))),
    };
    Ok(PgTarget {
        config,
        tls,
        sslmode,
    })
}

/// Where `cfg` points, without credentials (for messages): `host:port/dbname`.
pub fn describe(cfg: &postgres::Config) -> String {
    let host = match cfg.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", cfg.get_dbname().unwrap_or("(default)"))
}

/// A connection error with its cause: the server's message (a refused
/// password, a database that does not exist, a server that takes TLS only) or
/// the I/O or TLS failure under it, where the error's own text says only "db
/// error" or "error performing TLS handshake".
pub fn explain(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// `%XX` escapes of a URL's query value.
fn decode(v: &str) -> Result<String, PgUrlError> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = v
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| PgUrlError(format!("a bad %-escape in the URL's query: {v}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| PgUrlError("the URL's query is not UTF-8".into()))
}

fn client_config(rootcert: Option<&str>) -> Result<rustls::ClientConfig, PgUrlError> {
    let mut roots = rustls::RootCertStore::empty();
    match rootcert {
        Some(path) if path != "system" => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| PgUrlError(format!("sslrootcert {path}: {e}")))?
                .collect::<Result<_, _>>()
                .map_err(|e| PgUrlError(format!("sslrootcert {path}: {e}")))?;
            if certs.is_empty() {
                return Err(PgUrlError(format!(
                    "sslrootcert {path}: no PEM certificate in it"
                )));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| PgUrlError(format!("sslrootcert {path}: {e}")))?;
            }
        }
        _ => {
            let found = rustls_native_certs::load_native_certs();
            let (n, _) = roots.add_parsable_certificates(found.certs);
            if n == 0 {
                return Err(PgUrlError(
                    "TLS to PostgreSQL: no system CA certificates found; name the server's CA with sslrootcert=FILE".into(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PgUrlError(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The TLS connector of a [`PgTarget`] (none: `sslmode=disable`).
#[derive(Clone)]
pub struct PgTls(Option<Arc<rustls::ClientConfig>>);

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, io::Error> {
        Ok(PgTlsConnect {
            config: self.0.clone(),
            domain: domain.to_string(),
        })
    }
}

/// One connection's TLS handshake.
pub struct PgTlsConnect {
    config: Option<Arc<rustls::ClientConfig>>,
    domain: String,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let config = self
                .config
                .ok_or_else(|| io::Error::other("TLS requested with sslmode=disable"))?;
            let name = ServerName::try_from(self.domain.clone()).map_err(|_| {
                io::Error::other(format!(
                    "TLS needs a host name or IP address to verify, not {:?}",
                    self.domain
                ))
            })?;
            let s = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await?;
            Ok(PgTlsStream(s))
        })
    }
}

/// A TLS connection to PostgreSQL.
pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_options_are_taken_from_the_url_and_bad_ones_named() {
        let t = pg_target("postgres://u:secret@db.example:5433/retune").unwrap();
        assert_eq!(t.sslmode, "disable");
        assert!(t.tls.0.is_none());
        assert_eq!(t.config.get_dbname(), Some("retune"));
        let t = pg_target(
            "postgresql://u@db/retune?application_name=x&sslmode=verify-full&sslrootcert=system",
        )
        .unwrap();
        assert_eq!(t.sslmode, "verify-full");
        assert!(t.tls.0.is_some());
        assert_eq!(t.config.get_application_name(), Some("x"));
        assert_eq!(t.config.get_ssl_mode(), postgres::config::SslMode::Require);
        for (url, says) in [
            (
                "postgres://db/x?sslmode=allow",
                "sslmode=allow is not supported",
            ),
            ("postgres://db/x?sslcert=/c.pem", "sslcert is not supported"),
            (
                "postgres://db/x?sslmode=require&sslrootcert=/nonexistent/ca.pem",
                "sslrootcert /nonexistent/ca.pem",
            ),
            ("postgres://db/x?sslrootcert=%zz", "bad %-escape"),
            (
                "postgres://u:secret@db/x?nonsense=1",
                "not a PostgreSQL URL",
            ),
        ] {
            let e = pg_target(url).err().unwrap().to_string();
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }
}
