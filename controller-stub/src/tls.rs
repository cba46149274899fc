//! The controller's side of the mutual-TLS control channel.
//!
//! Agents dial the controller (default tcp/443) and every byte of the
//! protocol then flows over this TLS 1.3 session. The controller requires a
//! client certificate issued by its own CA (see [`crate::pki`]) and trusts no
//! other root: a certificate from any other CA, or none, ends the handshake.
//! Once the handshake is done, [`agent_id_from_peer`] turns the agent's
//! certificate into the agent id used for sessions, logs and store paths; an
//! agent cannot claim to be another one.
//!
//! The client verifier also consults the revocation list
//! ([`crate::revocation`]): a certificate of a revoked agent passes the CA
//! check and is then refused with the TLS alert `certificate_revoked`,
//! before any protocol byte is exchanged.
//!
//! The ring provider is named explicitly so that the process-wide default
//! provider (which may be unset, or another one) never decides what is used.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use serde::Serialize;
use tideline_protocol::limits::valid_id;

use crate::revocation::Revocations;

/// Why the TLS configuration could not be built or a peer not identified.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
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
        /// rustls' or webpki's reason.
        reason: String,
    },
    /// rustls refused the configuration (certificate and key do not match,
    /// unsupported key type, ...).
    #[error("TLS configuration with {} and {}: {source}", cert.display(), key.display())]
    Config {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' error.
        source: rustls::Error,
    },
    /// The peer presented no certificate.
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    /// The peer's certificate could not be parsed.
    #[error("peer certificate does not parse: {0}")]
    BadPeerCertificate(String),
    /// The peer's certificate subject has no usable common name.
    #[error("peer certificate has no UTF-8 subject common name")]
    NoCommonName,
    /// The common name is not a valid agent id.
    #[error("peer certificate common name {0:?} is not a valid agent id")]
    InvalidAgentId(String),
}

/// Builds the server configuration: TLS 1.3 only, the ring provider, the
/// certificate chain of `cert` with the key of `key`, and client
/// certificates required, verified against the CA(s) in `ca` only, and
/// refused when `revocations` (read at every handshake) revokes them.
pub fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    revocations: Arc<Revocations>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = load_roots(ca)?;
    let ca_verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| TlsError::BadCa {
                path: ca.to_path_buf(),
                reason: e.to_string(),
            })?;
    let verifier = Arc::new(RevocationCheckingVerifier {
        ca: ca_verifier,
        revocations,
    });
    let chain = load_certs(cert)?;
    let private_key = load_key(key)?;
    let config_err = |source| TlsError::Config {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        source,
    };
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, private_key)
        .map_err(config_err)?;
    Ok(Arc::new(config))
}

/// The CA check of rustls' WebPKI verifier, then the revocation list.
#[derive(Debug)]
struct RevocationCheckingVerifier {
    ca: Arc<dyn ClientCertVerifier>,
    revocations: Arc<Revocations>,
}

impl ClientCertVerifier for RevocationCheckingVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.ca.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.ca.verify_client_cert(end_entity, intermediates, now)?;
        // A certificate that names no agent is refused after the handshake,
        // with its own message; only a named agent can be revoked.
        if let Ok(cert) = PeerCertificate::from_der(end_entity) {
            if let Some(refusal) = self.revocations.check(&cert) {
                // The alert carries no text: the log names the agent.
                tracing::warn!(agent = %cert.agent, refusal = %refusal, "TLS handshake refused: revoked certificate");
                return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
            }
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.ca.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.ca.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.ca.supported_verify_schemes()
    }
}

/// An agent's certificate as the revocation list sees it: whom it names
/// and which certificate it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerCertificate {
    /// The agent id (subject common name).
    pub agent: String,
    /// Serial number, lower-case hex without leading zeros.
    pub serial: String,
    /// SHA-256 of the DER certificate, 64 lower-case hex digits (what
    /// `openssl x509 -noout -fingerprint -sha256` prints, without colons).
    pub sha256: String,
}

impl PeerCertificate {
    /// Reads a DER certificate: its agent id (a single valid CN), serial
    /// and fingerprint.
    pub fn from_der(der: &CertificateDer<'_>) -> Result<PeerCertificate, TlsError> {
        let (_, x509) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| TlsError::BadPeerCertificate(e.to_string()))?;
        let mut names = x509.subject().iter_common_name();
        let cn = names
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or(TlsError::NoCommonName)?;
        // Two common names would make the identity ambiguous.
        if names.next().is_some() || !valid_id(cn) {
            return Err(TlsError::InvalidAgentId(cn.to_string()));
        }
        let serial = x509
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        let serial = match serial.trim_start_matches('0') {
            "" => "0".to_owned(),
            s => s.to_owned(),
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let sha256 = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Ok(PeerCertificate {
            agent: cn.to_owned(),
            serial,
            sha256,
        })
    }

    /// The leaf of a verified peer's chain. Pass
    /// `ServerConnection::peer_certificates()`.
    pub fn from_peer(certs: Option<&[CertificateDer<'_>]>) -> Result<PeerCertificate, TlsError> {
        let leaf = certs
            .and_then(|c| c.first())
            .ok_or(TlsError::NoPeerCertificate)?;
        PeerCertificate::from_der(leaf)
    }
}

/// The agent id of a verified peer: the subject common name of its leaf
/// certificate, which must be a valid id.
///
/// Pass `ServerConnection::peer_certificates()`. The chain has already been
/// verified against the CA by the handshake; this only reads it.
pub fn agent_id_from_peer(certs: Option<&[CertificateDer<'_>]>) -> Result<String, TlsError> {
    PeerCertificate::from_peer(certs).map(|c| c.agent)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
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
    use crate::pki;
    use rustls::pki_types::ServerName;
    use rustls::ClientConfig;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    struct Pki {
        _dir: tempfile::TempDir,
        controller: pki::Issued,
        agent: pki::Issued,
        foreign_agent: pki::Issued,
    }

    /// A CA with a controller and an agent certificate, plus a foreign CA
    /// with an agent certificate of the same name.
    fn make_pki() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let foreign = dir.path().join("foreign");
        pki::init_ca(&ca, "Tideline test CA").unwrap();
        pki::init_ca(&foreign, "Foreign CA").unwrap();
        let sans = ["localhost".to_string(), "127.0.0.1".to_string()];
        let controller =
            pki::issue_controller(&ca, &dir.path().join("controller"), "controller", &sans)
                .unwrap();
        let agent = pki::issue_agent(&ca, &dir.path().join("agent"), "agent-1").unwrap();
        let foreign_agent =
            pki::issue_agent(&foreign, &dir.path().join("foreign-agent"), "agent-1").unwrap();
        Pki {
            _dir: dir,
            controller,
            agent,
            foreign_agent,
        }
    }

    fn client_builder(
        ca: &Path,
    ) -> rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert> {
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(load_roots(ca).unwrap())
    }

    fn client_with_cert(ca: &Path, id: &pki::Issued) -> Arc<ClientConfig> {
        Arc::new(
            client_builder(ca)
                .with_client_auth_cert(load_certs(&id.cert).unwrap(), load_key(&id.key).unwrap())
                .unwrap(),
        )
    }

    /// Runs one handshake; returns the server's result (the agent id it saw)
    /// and whether the client completed a round trip.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> (Result<String, String>, Result<(), String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = TlsAcceptor::from(server)
                .accept(tcp)
                .await
                .map_err(|e| e.to_string())?;
            let id = agent_id_from_peer(tls.get_ref().1.peer_certificates())
                .map_err(|e| e.to_string())?;
            tls.write_all(b"ok").await.map_err(|e| e.to_string())?;
            tls.shutdown().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(id)
        });
        let client_result = async {
            let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
            let mut tls = TlsConnector::from(client)
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            // With TLS 1.3 the client learns that its certificate was refused
            // only when it next reads.
            let mut buf = [0u8; 2];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            if &buf != b"ok" {
                return Err("unexpected reply".to_string());
            }
            Ok(())
        }
        .await;
        let server_result = server_task.await.unwrap();
        (server_result, client_result)
    }

    fn no_revocations() -> Arc<Revocations> {
        Arc::new(Revocations::empty(Path::new("/nonexistent/revoked.toml")))
    }

    fn controller_config(p: &Pki) -> Arc<ServerConfig> {
        server_config(
            &p.controller.ca,
            &p.controller.cert,
            &p.controller.key,
            no_revocations(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn revoked_agent_is_refused_with_certificate_revoked() {
        use crate::revocation::RevocationTarget;
        let p = make_pki();
        let dir = tempfile::tempdir().unwrap();
        let revocations = Arc::new(Revocations::load(&dir.path().join("revoked.toml")).unwrap());
        let server = server_config(
            &p.controller.ca,
            &p.controller.cert,
            &p.controller.key,
            revocations.clone(),
        )
        .unwrap();
        let target = RevocationTarget::new("agent-1", None, None).unwrap();
        revocations
            .edit(|l| l.revoke(&target, "stolen", "now"))
            .unwrap();
        let client = client_with_cert(&p.agent.ca, &p.agent);
        let (server_result, client_result) = handshake(server.clone(), client.clone()).await;
        let err = server_result.unwrap_err();
        assert!(err.contains("Revoked"), "{err}");
        let err = client_result.unwrap_err();
        assert!(err.contains("CertificateRevoked"), "{err}");
        // The list is read at every handshake: lifting the entry lets the
        // same configuration accept the agent again.
        revocations.edit(|l| Ok(l.unrevoke(&target))).unwrap();
        let (server_result, client_result) = handshake(server, client).await;
        assert_eq!(server_result, Ok("agent-1".to_string()));
        assert_eq!(client_result, Ok(()));
    }

    #[test]
    fn peer_certificate_has_the_fingerprint_and_serial_openssl_shows() {
        let p = make_pki();
        let der = load_certs(&p.agent.cert).unwrap().remove(0);
        let c = PeerCertificate::from_der(&der).unwrap();
        assert_eq!(c.agent, "agent-1");
        assert_eq!(c.sha256.len(), 64);
        assert!(c
            .sha256
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        let serial = x509.raw_serial_as_string().replace(':', "");
        assert_eq!(c.serial, serial.trim_start_matches('0'));
    }

    #[tokio::test]
    async fn good_handshake_identifies_the_agent() {
        let p = make_pki();
        let client = client_with_cert(&p.agent.ca, &p.agent);
        let (server, client) = handshake(controller_config(&p), client).await;
        assert_eq!(server, Ok("agent-1".to_string()));
        assert_eq!(client, Ok(()));
    }

    #[tokio::test]
    async fn client_without_certificate_is_refused() {
        let p = make_pki();
        let client = Arc::new(client_builder(&p.agent.ca).with_no_client_auth());
        let (server, client) = handshake(controller_config(&p), client).await;
        let err = server.unwrap_err();
        assert!(err.to_lowercase().contains("certificate"), "{err}");
        assert!(client.is_err());
    }

    #[tokio::test]
    async fn client_certificate_from_foreign_ca_is_refused() {
        let p = make_pki();
        // Trusts the right CA for the server, but presents a foreign cert.
        let client = client_with_cert(&p.agent.ca, &p.foreign_agent);
        let (server, client) = handshake(controller_config(&p), client).await;
        let err = server.unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
        assert!(client.is_err());
    }

    #[tokio::test]
    async fn client_trusting_foreign_ca_refuses_the_controller() {
        let p = make_pki();
        let client = client_with_cert(&p.foreign_agent.ca, &p.agent);
        let (server, client) = handshake(controller_config(&p), client).await;
        let err = client.unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
        assert!(server.is_err());
    }

    #[test]
    fn agent_id_requires_a_valid_certificate() {
        assert!(matches!(
            agent_id_from_peer(None),
            Err(TlsError::NoPeerCertificate)
        ));
        assert!(matches!(
            agent_id_from_peer(Some(&[])),
            Err(TlsError::NoPeerCertificate)
        ));
        let junk = [CertificateDer::from(vec![1u8, 2, 3])];
        assert!(matches!(
            agent_id_from_peer(Some(&junk)),
            Err(TlsError::BadPeerCertificate(_))
        ));
        // A controller certificate's CN is a valid id, a CA's "Foreign CA" is not.
        let p = make_pki();
        let ca = load_certs(&p.foreign_agent.ca).unwrap();
        assert!(matches!(
            agent_id_from_peer(Some(&ca)),
            Err(TlsError::InvalidAgentId(cn)) if cn == "Foreign CA"
        ));
    }

    #[test]
    fn config_errors_name_the_file() {
        let p = make_pki();
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.crt");
        let garbage = dir.path().join("garbage.pem");
        fs::write(&garbage, b"not pem at all\n").unwrap();

        let server_config =
            |ca: &Path, cert: &Path, key: &Path| server_config(ca, cert, key, no_revocations());
        let err = server_config(&missing, &p.controller.cert, &p.controller.key).unwrap_err();
        assert!(
            matches!(err, TlsError::Read { ref path, .. } if *path == missing),
            "{err}"
        );
        let err = server_config(&p.controller.ca, &garbage, &p.controller.key).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { ref path, .. } if *path == garbage));
        let err = server_config(&p.controller.ca, &p.controller.cert, &garbage).unwrap_err();
        assert!(matches!(err, TlsError::BadKey { ref path, .. } if *path == garbage));
        assert!(err.to_string().contains("garbage.pem"));
        // Certificate and key of different identities.
        let err = server_config(&p.controller.ca, &p.controller.cert, &p.agent.key).unwrap_err();
        assert!(matches!(err, TlsError::Config { .. }), "{err}");
    }
}
