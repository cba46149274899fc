//! The agent's side of the mutual-TLS control channel.
//!
//! The agent dials the controller and keeps one TLS 1.3 connection open;
//! every session runs over it. The agent trusts only the CA it was enrolled
//! with (never the system roots: a replica must not be streamed to whoever
//! holds some public certificate for the controller's name) and presents its
//! own certificate, whose common name is its agent id.
//!
//! The ring provider is named explicitly so that the process-wide default
//! provider never decides what is used.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// Why the agent's TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("cannot read {}: {cause}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        cause: std::io::Error,
    },
    /// A file holds no PEM certificate, or an unreadable one.
    #[error("no usable certificate in {}: {reason}", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// A key file holds no usable private key.
    #[error("bad private key in {}: {reason}", path.display())]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A CA certificate was rejected as a trust anchor.
    #[error("CA certificate in {} cannot be used as a root: {reason}", path.display())]
    BadCa {
        /// The CA file.
        path: PathBuf,
        /// webpki's reason.
        reason: String,
    },
    /// The private key is not the one of the certificate.
    #[error("private key {} does not belong to certificate {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rustls refused the configuration (unsupported key type, ...).
    #[error("TLS configuration with {} and {}: {cause}", cert.display(), key.display())]
    Config {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' error.
        cause: rustls::Error,
    },
}

/// Builds the client configuration: TLS 1.3 only, the ring provider, the
/// CA(s) in `ca` as the only roots, and the chain of `cert` with the key of
/// `key` presented as client certificate.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = load_roots(ca)?;
    let chain = load_certs(cert)?;
    let private_key = load_key(key)?;
    let config_err = |cause| match cause {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            TlsError::KeyMismatch {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            }
        }
        // The end-entity certificate is parsed only here, to match it with
        // the key: a PEM block that is no certificate shows up now.
        rustls::Error::InvalidCertificate(why) => TlsError::NoCertificate {
            path: cert.to_path_buf(),
            reason: format!("the certificate does not parse: {why}"),
        },
        cause => TlsError::Config {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            cause,
        },
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, private_key)
        .map_err(config_err)?;
    Ok(Arc::new(config))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|cause| TlsError::Read {
        path: path.to_path_buf(),
        cause,
    })
}

/// Every PEM certificate in `path`, at least one.
fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::NoCertificate {
            path: path.to_path_buf(),
            reason: format!("unreadable PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
            reason: "no PEM CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| TlsError::BadKey {
            path: path.to_path_buf(),
            reason: format!("unreadable PEM: {e}"),
        })?
        .ok_or_else(|| TlsError::BadKey {
            path: path.to_path_buf(),
            reason: "no PEM private key block".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PEM block whose base64 decodes to bytes that are not a certificate.
    const FAKE_CERT: &str = "-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n";

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        let err =
            client_config(&ca, &dir.path().join("a.crt"), &dir.path().join("a.key")).unwrap_err();
        assert!(
            matches!(err, TlsError::Read { ref path, .. } if *path == ca),
            "{err}"
        );
        assert!(err.to_string().contains("ca.crt"));
    }

    #[test]
    fn garbage_files_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.pem");
        fs::write(&garbage, b"this is not PEM\n").unwrap();
        let fake = dir.path().join("fake.crt");
        fs::write(&fake, FAKE_CERT).unwrap();

        // No certificate at all in the CA file.
        let err = client_config(&garbage, &garbage, &garbage).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { ref path, .. } if *path == garbage));
        assert!(err.to_string().contains("garbage.pem"), "{err}");
        // A PEM certificate block that is not a certificate cannot be a root.
        let err = client_config(&fake, &fake, &garbage).unwrap_err();
        assert!(
            matches!(err, TlsError::BadCa { ref path, .. } if *path == fake),
            "{err}"
        );
    }

    #[test]
    fn missing_key_is_named() {
        assert!(matches!(
            load_key(Path::new("/nonexistent/agent.key")),
            Err(TlsError::Read { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let cert_only = dir.path().join("agent.key");
        fs::write(&cert_only, FAKE_CERT).unwrap();
        let err = load_key(&cert_only).unwrap_err();
        assert!(matches!(err, TlsError::BadKey { ref path, .. } if *path == cert_only));
        assert!(err.to_string().contains("agent.key"), "{err}");
    }

    #[test]
    fn certificate_chain_is_loaded_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let two = dir.path().join("chain.crt");
        fs::write(&two, format!("{FAKE_CERT}{FAKE_CERT}")).unwrap();
        assert_eq!(load_certs(&two).unwrap().len(), 2);
    }
}
