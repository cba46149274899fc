//! Certificates for the mutual-TLS control channel, made with rcgen so that
//! the demo, the end-to-end tests and a small installation need no openssl.
//!
//! Every connection between an agent and the controller is TLS 1.3 with
//! certificates on both sides, all issued by one private CA:
//!
//! * [`init_ca`] creates the CA (`ca.crt`, `ca.key`) once; it refuses to
//!   overwrite an existing one, because every issued certificate would stop
//!   verifying;
//! * [`issue_controller`] issues the controller's server certificate
//!   (EKU serverAuth, SANs for the names and addresses agents dial);
//! * [`issue_agent`] issues an agent's client certificate (EKU clientAuth).
//!   Its subject CN *is* the agent id: the controller identifies an agent by
//!   its certificate (see [`crate::tls::agent_id_from_peer`]), never by what
//!   the agent claims in the protocol.
//!
//! Keys are ECDSA P-256, written PEM (PKCS#8) with mode 0600. The CA is valid
//! for 10 years, leaf certificates for 2 years. Leaf files are written as a
//! temporary file that is fsynced and renamed into place, so a crash never
//! leaves a half-written key next to its certificate.
//!
//! rcgen (as built here, without its `x509-parser` feature) cannot load an
//! existing CA certificate, so the issuer is rebuilt from the CA's subject
//! common name and its key; the issued certificate's issuer name is then
//! checked byte for byte against the subject of `ca.crt`.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use tideline_protocol::limits::valid_id;

/// File name of the CA certificate in a CA directory and next to every issued
/// certificate.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key in a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";

const DAY: u64 = 24 * 60 * 60;
/// Validity of the CA: 10 years.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * DAY + 3 * DAY);
/// Validity of controller and agent certificates: 2 years.
const LEAF_VALIDITY: Duration = Duration::from_secs(2 * 365 * DAY + DAY);
/// Backdating of `notBefore`, so that a peer whose clock is slightly behind
/// accepts a certificate issued a moment ago.
const BACKDATE: Duration = Duration::from_secs(60 * 60);

/// Paths of an issued certificate, its key and the CA certificate that
/// verifies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key (mode 0600).
    pub key: PathBuf,
    /// PEM CA certificate.
    pub ca: PathBuf,
}

/// Why a CA could not be created or a certificate issued.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read, written or created.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `init_ca` found a CA file already in place.
    #[error("refusing to overwrite existing CA file {}", path.display())]
    CaExists {
        /// The existing file.
        path: PathBuf,
    },
    /// The CA certificate or key in the CA directory is unusable.
    #[error("bad CA file {}: {reason}", path.display())]
    BadCa {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rcgen refused to generate a key or certificate.
    #[error("cannot generate {what}: {source}")]
    Generate {
        /// The key or certificate being generated.
        what: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// A certificate or agent name is not a valid id (it also names files).
    #[error("invalid name {0:?}: use 1-128 ASCII letters, digits, '.', '_' or '-', not starting with '.'")]
    InvalidName(String),
    /// A subject alternative name is neither an IP address nor a DNS name.
    #[error("invalid subject alternative name {0:?}")]
    InvalidSan(String),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |source| PkiError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn gen_err(what: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |source| PkiError::Generate {
        what: what.to_string(),
        source,
    }
}

/// Creates a CA in `dir`: `dir/ca.crt` and `dir/ca.key` (mode 0600).
///
/// Refuses to overwrite an existing CA; the error names the file found.
/// In the result, `cert` and `ca` are both `ca.crt`.
pub fn init_ca(dir: &Path, common_name: &str) -> Result<Issued, PkiError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(PkiError::CaExists { path: path.clone() });
        }
    }
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err("CA key"))?;
    let cert = ca_params(common_name, SystemTime::now())
        .self_signed(&key)
        .map_err(gen_err("CA certificate"))?;

    // create_new: a CA appearing between the check above and here is not
    // overwritten either.
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    if let Err(e) = write_new(&cert_path, cert.pem().as_bytes(), 0o644) {
        let _ = fs::remove_file(&key_path);
        return Err(e);
    }
    sync_dir(dir)?;
    Ok(Issued {
        cert: cert_path.clone(),
        key: key_path,
        ca: cert_path,
    })
}

/// Issues the controller's server certificate, signed by the CA in `ca_dir`.
///
/// Each entry of `sans` becomes an IP address SAN if it parses as one, a DNS
/// name SAN otherwise. Writes `out_dir/<name>.crt`, `out_dir/<name>.key`
/// (mode 0600) and a copy of `ca.crt`.
pub fn issue_controller(
    ca_dir: &Path,
    out_dir: &Path,
    name: &str,
    sans: &[String],
) -> Result<Issued, PkiError> {
    if !valid_id(name) {
        return Err(PkiError::InvalidName(name.to_string()));
    }
    let mut alt_names = Vec::with_capacity(sans.len());
    for san in sans {
        alt_names.push(match san.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                san.clone()
                    .try_into()
                    .map_err(|_| PkiError::InvalidSan(san.clone()))?,
            ),
        });
    }
    let mut params = leaf_params(name, SystemTime::now());
    params.subject_alt_names = alt_names;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    issue(ca_dir, out_dir, name, params)
}

/// Issues an agent's client certificate, signed by the CA in `ca_dir`.
///
/// The subject CN and a DNS SAN are `agent_id`, which must be a valid id.
/// Writes `out_dir/<agent_id>.crt`, `out_dir/<agent_id>.key` (mode 0600) and
/// a copy of `ca.crt`.
pub fn issue_agent(ca_dir: &Path, out_dir: &Path, agent_id: &str) -> Result<Issued, PkiError> {
    if !valid_id(agent_id) {
        return Err(PkiError::InvalidName(agent_id.to_string()));
    }
    let mut params = leaf_params(agent_id, SystemTime::now());
    let dns = agent_id
        .to_string()
        .try_into()
        .map_err(|_| PkiError::InvalidSan(agent_id.to_string()))?;
    params.subject_alt_names = vec![SanType::DnsName(dns)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    issue(ca_dir, out_dir, agent_id, params)
}

fn ca_params(common_name: &str, now: SystemTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + CA_VALIDITY).into();
    params
}

fn leaf_params(common_name: &str, now: SystemTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + LEAF_VALIDITY).into();
    params
}

/// The CA of `ca_dir`, loaded and rebuilt as an rcgen issuer.
struct LoadedCa {
    issuer: rcgen::Certificate,
    key: KeyPair,
    /// DER of the subject name of `ca.crt`.
    subject_der: Vec<u8>,
    pem: Vec<u8>,
    cert_path: PathBuf,
}

fn load_ca(ca_dir: &Path) -> Result<LoadedCa, PkiError> {
    let cert_path = ca_dir.join(CA_CERT_FILE);
    let key_path = ca_dir.join(CA_KEY_FILE);
    let pem = fs::read(&cert_path).map_err(io_err("read CA certificate", &cert_path))?;
    let key_pem = fs::read_to_string(&key_path).map_err(io_err("read CA key", &key_path))?;
    let bad_cert = |reason: String| PkiError::BadCa {
        path: cert_path.clone(),
        reason,
    };

    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .ok_or_else(|| bad_cert("no PEM certificate in it".into()))?
        .map_err(|e| bad_cert(format!("unreadable PEM: {e}")))?;
    let (_, x509) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| bad_cert(format!("not an X.509 certificate: {e}")))?;
    if !x509.is_ca() {
        return Err(bad_cert("not a CA certificate".into()));
    }
    let cn = x509
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| bad_cert("subject has no UTF-8 common name".into()))?
        .to_string();
    let subject_der = x509.subject().as_raw().to_vec();
    let ca_public_key = x509.public_key().raw.to_vec();

    let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::BadCa {
        path: key_path.clone(),
        reason: format!("not a PEM private key: {e}"),
    })?;
    if key.public_key_der() != ca_public_key {
        return Err(PkiError::BadCa {
            path: key_path,
            reason: format!("key does not belong to {}", cert_path.display()),
        });
    }
    // Only the issuer's name, key and key identifier method matter for
    // signing; they are the same as in the original CA certificate.
    let issuer = ca_params(&cn, SystemTime::now())
        .self_signed(&key)
        .map_err(gen_err("CA issuer"))?;
    Ok(LoadedCa {
        issuer,
        key,
        subject_der,
        pem,
        cert_path,
    })
}

fn issue(
    ca_dir: &Path,
    out_dir: &Path,
    name: &str,
    params: CertificateParams,
) -> Result<Issued, PkiError> {
    let ca = load_ca(ca_dir)?;
    let key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| PkiError::Generate {
            what: format!("key for {name}"),
            source,
        })?;
    let cert = params
        .signed_by(&key, &ca.issuer, &ca.key)
        .map_err(|source| PkiError::Generate {
            what: format!("certificate for {name}"),
            source,
        })?;

    // The rebuilt issuer must name the CA exactly as ca.crt does, or peers
    // could not chain the new certificate to it.
    let (_, issued) =
        x509_parser::parse_x509_certificate(cert.der()).map_err(|e| PkiError::BadCa {
            path: ca.cert_path.clone(),
            reason: format!("issued certificate does not parse: {e}"),
        })?;
    if issued.issuer().as_raw() != ca.subject_der.as_slice() {
        return Err(PkiError::BadCa {
            path: ca.cert_path.clone(),
            reason:
                "subject name cannot be reproduced for issuing (it must hold only a common name)"
                    .into(),
        });
    }

    fs::create_dir_all(out_dir).map_err(io_err("create directory", out_dir))?;
    let cert_path = out_dir.join(format!("{name}.crt"));
    let key_path = out_dir.join(format!("{name}.key"));
    let ca_copy = out_dir.join(CA_CERT_FILE);
    write_replace(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_replace(&cert_path, cert.pem().as_bytes(), 0o644)?;
    if !same_file(&ca.cert_path, &ca_copy) {
        write_replace(&ca_copy, &ca.pem, 0o644)?;
    }
    sync_dir(out_dir)?;
    Ok(Issued {
        cert: cert_path,
        key: key_path,
        ca: ca_copy,
    })
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Writes `bytes` to a new file at `path` with `mode`; fails if it exists.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err("create", path))?;
    f.write_all(bytes).map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("fsync", path))
}

/// Writes `bytes` to `path` atomically: a temporary file with `mode` (so a
/// key is never readable by others, not even briefly), fsync, rename.
fn write_replace(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, bytes, mode)?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        PkiError::Io {
            op: "rename into place",
            path: path.to_path_buf(),
            source: e,
        }
    })
}

fn sync_dir(dir: &Path) -> Result<(), PkiError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use x509_parser::extensions::GeneralName;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn parse(path: &Path) -> Vec<u8> {
        let pem = fs::read(path).unwrap();
        let der = rustls_pemfile::certs(&mut pem.as_slice())
            .next()
            .unwrap()
            .unwrap();
        der.to_vec()
    }

    #[test]
    fn ca_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init_ca(dir.path(), "Tideline test CA").unwrap();
        assert_eq!(ca.cert, ca.ca);
        assert_eq!(mode(&ca.key), 0o600);
        let der = parse(&ca.cert);
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(x.is_ca());
        let years = (x.validity().not_after.timestamp() - x.validity().not_before.timestamp())
            / (365 * 86400);
        assert_eq!(years, 10);

        match init_ca(dir.path(), "again") {
            Err(PkiError::CaExists { path }) => assert_eq!(path, dir.path().join("ca.crt")),
            other => panic!("expected CaExists, got {other:?}"),
        }
        // Only the key left: still refused, and the message names the key.
        fs::remove_file(&ca.cert).unwrap();
        let err = init_ca(dir.path(), "again").unwrap_err();
        assert!(err.to_string().contains("ca.key"), "{err}");
    }

    #[test]
    fn controller_certificate_has_sans_and_server_auth() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let out = dir.path().join("controller");
        init_ca(&ca_dir, "Tideline test CA").unwrap();
        let sans = vec!["127.0.0.1".to_string(), "controller.example".to_string()];
        let issued = issue_controller(&ca_dir, &out, "controller", &sans).unwrap();
        assert_eq!(issued.cert, out.join("controller.crt"));
        assert_eq!(issued.ca, out.join("ca.crt"));
        assert_eq!(mode(&issued.key), 0o600);
        assert_eq!(
            fs::read(&issued.ca).unwrap(),
            fs::read(ca_dir.join("ca.crt")).unwrap()
        );

        let der = parse(&issued.cert);
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = x.subject_alternative_name().unwrap().unwrap();
        let names = &san.value.general_names;
        assert!(names
            .iter()
            .any(|n| matches!(n, GeneralName::IPAddress(ip) if *ip == [127, 0, 0, 1])));
        assert!(names
            .iter()
            .any(|n| matches!(n, GeneralName::DNSName("controller.example"))));
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        let years = (x.validity().not_after.timestamp() - x.validity().not_before.timestamp())
            / (365 * 86400);
        assert_eq!(years, 2);

        let ca_der = parse(&issued.ca);
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        // Chains to the CA by name; the TLS tests check the signature.
        assert_eq!(x.issuer().as_raw(), ca.subject().as_raw());
    }

    #[test]
    fn agent_certificate_names_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "Tideline test CA").unwrap();
        // Issuing into the CA directory itself keeps ca.crt as it is.
        let issued = issue_agent(dir.path(), dir.path(), "host-01.example").unwrap();
        assert_eq!(issued.ca, dir.path().join("ca.crt"));
        let der = parse(&issued.cert);
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn = x
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, "host-01.example");
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);

        assert!(matches!(
            issue_agent(dir.path(), dir.path(), "../evil"),
            Err(PkiError::InvalidName(_))
        ));
    }

    #[test]
    fn issuing_without_a_ca_names_the_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = issue_agent(dir.path(), dir.path(), "a1").unwrap_err();
        assert!(err.to_string().contains("ca.crt"), "{err}");
    }

    #[test]
    fn mismatched_ca_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        init_ca(&a, "A").unwrap();
        init_ca(&b, "B").unwrap();
        fs::copy(b.join("ca.key"), a.join("ca.key")).unwrap();
        match issue_agent(&a, dir.path(), "a1") {
            Err(PkiError::BadCa { path, .. }) => assert_eq!(path, a.join("ca.key")),
            other => panic!("expected BadCa, got {other:?}"),
        }
    }
}
