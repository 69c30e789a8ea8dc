//! TLS with rustls: the server's HTTPS configuration, and the roots the client SDK
//! and the Redis store trust.
//!
//! ```
//! // A PEM file that holds no certificate is refused with a reason, not a panic.
//! let err = presence::tls::certificates(b"not a certificate").unwrap_err();
//! assert!(err.contains("no certificate"), "{err}");
//! ```
//!
//! Every configuration here is built with ring as its crypto provider, named
//! explicitly: a build that also compiles in aws-lc-rs (through another dependency)
//! has no process-wide default provider, and rustls would panic when asked for one.
//!
//! The server offers `h2` and `http/1.1` by ALPN and serves what the client picked
//! (HTTP/1.1 when it offered neither). Clients verify servers against the system's
//! roots (`rustls-native-certs`: the OS store, `SSL_CERT_FILE` / `SSL_CERT_DIR`),
//! plus, or for Redis instead of, a CA given as PEM.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The ALPN protocols the server offers, preferred first.
pub const ALPN_PROTOCOLS: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// What is wrong with a certificate and key pair: which of the two, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsError {
    /// The certificate chain cannot be used.
    Certificate(String),
    /// The private key cannot be used (or does not belong to the certificate).
    Key(String),
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsError::Certificate(why) => write!(f, "certificate: {why}"),
            TlsError::Key(why) => write!(f, "private key: {why}"),
        }
    }
}

impl std::error::Error for TlsError {}

/// The crypto provider of every configuration made here (ring).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Makes ring the process-wide default provider unless one is installed already:
/// for libraries that build their TLS configuration with the default (the `redis`
/// crate), which does not exist when more than one provider is compiled in.
pub(crate) fn install_default_provider() {
    if CryptoProvider::get_default().is_none() {
        // Another thread may have won the race; its provider serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The certificates of a PEM text, in order (a server's chain: its own first).
///
/// # Errors
/// A PEM block that cannot be decoded, or no certificate at all.
pub fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate (-----BEGIN CERTIFICATE-----) in the file".into());
    }
    Ok(certs)
}

/// The HTTPS configuration of the server: the chain of `cert_pem`, the key of
/// `key_pem` (PKCS#8, PKCS#1 or SEC1), ALPN `h2` and `http/1.1`.
///
/// # Errors
/// Which of the two cannot be used and why, including a key that does not belong
/// to the certificate.
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<ServerConfig, TlsError> {
    let chain = certificates(cert_pem).map_err(TlsError::Certificate)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| TlsError::Key(format!("no usable PEM private key: {e}")))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Certificate(e.to_string()))?
        .with_no_client_auth();
    let mut config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            TlsError::Key("does not belong to the certificate".into())
        }
        rustls::Error::General(why) if why.contains("key") => TlsError::Key(why),
        other => TlsError::Certificate(other.to_string()),
    })?;
    config.alpn_protocols = ALPN_PROTOCOLS.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The system's trusted roots, loaded once per process. Certificates the loader
/// cannot read are skipped (and logged once): one bad file in the OS store must not
/// stop every TLS connection.
fn native_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let loaded = rustls_native_certs::load_native_certs();
        for e in &loaded.errors {
            tracing::warn!(error = %e, "cannot load some of the system's TLS roots");
        }
        loaded.certs
    })
}

/// Roots for verifying servers: the system's, plus the certificates of `extra_pem`
/// (a private CA); only those of `extra_pem` when `system` is false.
///
/// # Errors
/// `extra_pem` holds no usable certificate.
pub fn roots(extra_pem: Option<&[u8]>, system: bool) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    if system {
        // Certificates webpki cannot use as anchors are skipped, as browsers do.
        let _ = roots.add_parsable_certificates(native_roots().iter().cloned());
    }
    if let Some(pem) = extra_pem {
        for cert in certificates(pem)? {
            roots
                .add(cert)
                .map_err(|e| format!("not a usable CA certificate: {e}"))?;
        }
    }
    Ok(roots)
}

/// A client configuration that trusts `roots`, with ALPN `alpn` (empty: none).
///
/// # Errors
/// None with ring (it supports the default protocol versions); the `Result` keeps
/// a panic out of the library should a provider ever not.
pub fn client_config(roots: RootCertStore, alpn: &[&[u8]]) -> Result<ClientConfig, String> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS client configuration: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}
