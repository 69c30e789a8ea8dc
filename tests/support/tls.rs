//! TLS for the tests: a throwaway CA and a server certificate for `127.0.0.1` and
//! `localhost`, made with rcgen and written to a directory of their own (removed on
//! drop), and HTTPS clients that trust that CA.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A CA, a server certificate it signed (for `127.0.0.1` and `localhost`) and the
/// server's key, as PEM files in a fresh directory.
pub struct TestCerts {
    /// The directory holding the files.
    pub dir: PathBuf,
    /// The CA's certificate, PEM.
    pub ca_pem: String,
    /// `ca.pem`.
    pub ca_file: PathBuf,
    /// `cert.pem`: the server's certificate.
    pub cert_file: PathBuf,
    /// `key.pem`: the server's private key.
    pub key_file: PathBuf,
}

impl TestCerts {
    /// Makes the certificates and writes them under the temp directory.
    pub fn generate() -> TestCerts {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "presence-tls-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the certificate directory");

        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "presence test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-signed CA");
        let issuer = Issuer::new(ca_params, ca_key);

        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "presence test server");
        let cert = params.signed_by(&key, &issuer).expect("server certificate");

        let ca_pem = ca_cert.pem();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {name}: {e}"));
            path
        };
        TestCerts {
            ca_file: write("ca.pem", &ca_pem),
            cert_file: write("cert.pem", &cert.pem()),
            key_file: write("key.pem", &key.serialize_pem()),
            ca_pem,
            dir,
        }
    }

    /// The server's variables: `PRESENCE_TLS_CERT_FILE`, `PRESENCE_TLS_KEY_FILE`.
    pub fn server_vars(&self) -> [(&'static str, String); 2] {
        [
            (
                "PRESENCE_TLS_CERT_FILE",
                self.cert_file.display().to_string(),
            ),
            ("PRESENCE_TLS_KEY_FILE", self.key_file.display().to_string()),
        ]
    }

    /// A file in the directory with `text` in it (a bad certificate, say).
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {name}: {e}"));
        path
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A reqwest client that trusts only `certs`' CA, offers `h2` and `http/1.1` (only
/// `http/1.1` with `http1_only`), ignores proxies and gives up after 10 s.
pub fn https_client(certs: &TestCerts, http1_only: bool) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(certs.ca_pem.as_bytes()).expect("CA PEM");
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(10));
    if http1_only {
        builder = builder.http1_only();
    }
    builder
        .build()
        .unwrap_or_else(|e| panic!("reqwest HTTPS client: {e}"))
}
