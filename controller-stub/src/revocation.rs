//! The revocation list: agents and single agent certificates that the
//! controller refuses, although their CA issued them.
//!
//! Every client certificate the CA issued is otherwise valid for two years
//! (see [`crate::pki`]); this list is how one agent is locked out without
//! replacing the CA. It is checked in three places:
//!
//! * in the TLS client verifier ([`crate::tls::server_config`]): a full
//!   handshake with a revoked certificate ends with the TLS alert
//!   `certificate_revoked`, before any protocol byte;
//! * when a connection registers, under the registry lock
//!   ([`crate::registry::Controller::register_connection`]), so that a
//!   handshake that was verified just before an edit cannot slip in;
//! * whenever the list changes (`revoke`, `unrevoke`, SIGHUP): the live
//!   connections it now refuses are closed
//!   ([`crate::registry::Controller::enforce_revocations`]).
//!
//! # The file (`[tls] revoked`, default `<store.dir>/revoked.toml`)
//!
//! TOML, meant to be read and edited by hand:
//!
//! ```toml
//! version = 1                      # optional; 1 is the only version
//!
//! [[agent]]                        # every certificate whose CN is `id`
//! id = "web-1"
//! reason = "decommissioned"        # optional in the file, shown when refusing
//! revoked_at = "2024-06-10T12:00:00Z"   # optional, free text (at most 64 bytes)
//!
//! [[certificate]]                  # one certificate of `agent`
//! agent = "web-2"
//! sha256 = "9f86d081884c7d65…"     # SHA-256 of the DER certificate, 64 hex digits
//! serial = "3a5f0c"                # and/or its serial number in hex
//! reason = "laptop stolen"
//! ```
//!
//! * `[[agent]]` matches every certificate whose subject CN is `id`, whoever
//!   issued it and whenever: the agent id is locked out until the entry is
//!   removed.
//! * `[[certificate]]` matches a certificate whose CN is `agent` and whose
//!   fingerprint equals `sha256` and whose serial equals `serial` (each when
//!   given; at least one is required). A certificate issued again for the
//!   same agent has another fingerprint and serial and is not affected.
//! * Hex digits may be upper or lower case and separated by `:` (as
//!   `openssl x509 -noout -serial -fingerprint -sha256` prints them);
//!   leading zeros of a serial are ignored. The controller writes them in
//!   lower case without separators.
//! * Unknown keys, invalid ids, malformed hex and duplicate entries are
//!   errors that name the file and the entry (`certificate[1].sha256`).
//!   The file is read up to [`MAX_FILE_LEN`] bytes; reasons are at most
//!   [`MAX_REASON_LEN`] bytes.
//! * A missing file is an empty list. At start a file that does not load
//!   stops the controller (it fails closed); on SIGHUP it is reported and
//!   the previous list stays in force.
//!
//! The controller rewrites the file for `revoke` and `unrevoke`: it reads
//! the file again (so hand edits not yet reloaded are kept and take
//! effect), changes it, and writes it atomically: `<file>.tmp`, fsync,
//! rename over the file, fsync of the directory. A crash leaves the old or
//! the new list, never a torn one. Comments other than the header it writes
//! are not kept.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tideline_protocol::limits::valid_id;

use crate::tls::PeerCertificate;

/// File name of the revocation list in the store directory, when
/// `[tls] revoked` is not set.
pub const DEFAULT_FILE_NAME: &str = "revoked.toml";
/// The only version of the file format.
pub const FORMAT_VERSION: u32 = 1;
/// Largest revocation file read (about 10,000 entries).
pub const MAX_FILE_LEN: u64 = 4 << 20;
/// Largest `reason`, in bytes: a refusal that quotes it, with the agent id,
/// serial and fingerprint, about fits in one protocol error message (whose
/// text the encoder cuts at `MAX_TEXT_LEN`, 1024 bytes).
pub const MAX_REASON_LEN: usize = 512;
/// Largest `revoked_at`, in bytes.
const MAX_TIME_LEN: usize = 64;
/// Longest serial number accepted, in hex digits (RFC 5280 allows 20
/// octets; some CAs write a few more).
const MAX_SERIAL_DIGITS: usize = 64;

/// The header the controller writes at the top of the file.
const HEADER: &str = "\
# Revoked agents and agent certificates of a Tideline controller.
#
# Read when the controller starts and on SIGHUP; rewritten (atomically) by
# `tideline-controller revoke` and `unrevoke`, which keep entries but not
# comments. Each [[agent]] refuses every certificate whose CN is `id`; each
# [[certificate]] refuses one certificate of `agent`, by `sha256` (the
# fingerprint of the DER certificate) and/or `serial` (hex). See the
# operations guide, section 2, \"Revoking an agent\".

";

/// Why the revocation list could not be read, written or changed.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    /// The file exists but could not be read.
    #[error("cannot read revocation list {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_FILE_LEN`].
    #[error("revocation list {} is larger than {max} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        max: u64,
    },
    /// Not TOML of this schema (the message names key, line and column).
    #[error("invalid revocation list {}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, on one line.
        message: String,
    },
    /// An entry holds a value out of its domain.
    #[error("invalid revocation list {}: {key}: {message}", path.display())]
    Value {
        /// The file.
        path: PathBuf,
        /// Dotted key, e.g. `certificate[1].sha256`.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The new list could not be written; the old file is unchanged.
    #[error("cannot {op} revocation list {}: {source}", path.display())]
    Write {
        /// The file written (or its temporary file, or its directory).
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A revoke or unrevoke request is not valid (bad id, bad hex, no
    /// reason).
    #[error("{0}")]
    Request(String),
    /// An unrevoke request matched no entry.
    #[error("{0}")]
    NotRevoked(String),
}

/// The whole list, as in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationList {
    /// Format version, [`FORMAT_VERSION`].
    #[serde(default = "format_version")]
    pub version: u32,
    /// Agent ids whose every certificate is refused.
    #[serde(default, rename = "agent", skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<RevokedAgent>,
    /// Single certificates that are refused.
    #[serde(default, rename = "certificate", skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<RevokedCertificate>,
}

impl Default for RevocationList {
    fn default() -> Self {
        RevocationList {
            version: FORMAT_VERSION,
            agents: Vec::new(),
            certificates: Vec::new(),
        }
    }
}

fn format_version() -> u32 {
    FORMAT_VERSION
}

/// `[[agent]]`: every certificate of this agent id is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokedAgent {
    /// The agent id (the CN of its certificates).
    pub id: String,
    /// Why, for the logs and the admin interface.
    #[serde(default)]
    pub reason: String,
    /// When (RFC 3339 when written by the controller; free text by hand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

/// `[[certificate]]`: one certificate of an agent is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokedCertificate {
    /// The agent id the certificate names (its CN).
    pub agent: String,
    /// Serial number, lower-case hex without leading zeros.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// SHA-256 of the DER certificate, 64 lower-case hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Why.
    #[serde(default)]
    pub reason: String,
    /// When.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

impl RevokedCertificate {
    fn matches(&self, cert: &PeerCertificate) -> bool {
        self.agent == cert.agent
            && self.serial.as_ref().is_none_or(|s| *s == cert.serial)
            && self.sha256.as_ref().is_none_or(|f| *f == cert.sha256)
    }

    fn same_key(&self, other: &RevokedCertificate) -> bool {
        self.agent == other.agent && self.serial == other.serial && self.sha256 == other.sha256
    }
}

/// One entry, as the admin interface shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum RevocationEntry {
    /// An `[[agent]]` entry.
    Agent(RevokedAgent),
    /// A `[[certificate]]` entry.
    Certificate(RevokedCertificate),
}

impl RevocationEntry {
    /// The entry's reason.
    pub fn reason(&self) -> &str {
        match self {
            RevocationEntry::Agent(a) => &a.reason,
            RevocationEntry::Certificate(c) => &c.reason,
        }
    }

    /// When the entry was made, if known.
    pub fn revoked_at(&self) -> Option<&str> {
        match self {
            RevocationEntry::Agent(a) => a.revoked_at.as_deref(),
            RevocationEntry::Certificate(c) => c.revoked_at.as_deref(),
        }
    }
}

impl fmt::Display for RevocationEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RevocationEntry::Agent(a) => write!(f, "every certificate of agent {}", a.id)?,
            RevocationEntry::Certificate(c) => {
                write!(f, "certificate of agent {}", c.agent)?;
                if let Some(s) = &c.serial {
                    write!(f, " with serial {s}")?;
                }
                if let Some(h) = &c.sha256 {
                    let and = if c.serial.is_some() { " and" } else { " with" };
                    write!(f, "{and} sha256 {h}")?;
                }
            }
        }
        if let Some(at) = self.revoked_at() {
            write!(f, " (revoked {at})")?;
        }
        Ok(())
    }
}

/// Why a certificate is refused: the certificate and the entry that
/// revokes it. Its text is what the log, the agent and `agents` show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// The refused certificate.
    pub certificate: PeerCertificate,
    /// The entry that matched.
    pub entry: RevocationEntry,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.certificate;
        let reason = match self.entry.reason() {
            "" => "no reason given",
            r => r,
        };
        write!(
            f,
            "certificate of agent {} (serial {}, sha256 {}) is revoked: {}; reason: {reason}",
            c.agent, c.serial, c.sha256, self.entry
        )
    }
}

/// What a `revoke` or `unrevoke` names: an agent id, and optionally one of
/// its certificates by serial and/or fingerprint (normalized).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationTarget {
    /// Agent id.
    pub agent: String,
    /// Serial, normalized hex.
    pub serial: Option<String>,
    /// SHA-256 fingerprint, normalized hex.
    pub sha256: Option<String>,
}

impl RevocationTarget {
    /// Checks and normalizes a request's agent id, serial and fingerprint.
    pub fn new(
        agent: &str,
        serial: Option<&str>,
        sha256: Option<&str>,
    ) -> Result<RevocationTarget, RevocationError> {
        if !valid_id(agent) {
            return Err(RevocationError::Request(format!(
                "{agent:?} is not a valid agent id"
            )));
        }
        let serial = serial
            .map(|s| {
                normalize_serial(s).map_err(|m| RevocationError::Request(format!("serial: {m}")))
            })
            .transpose()?;
        let sha256 = sha256
            .map(|s| {
                normalize_sha256(s).map_err(|m| RevocationError::Request(format!("sha256: {m}")))
            })
            .transpose()?;
        Ok(RevocationTarget {
            agent: agent.to_owned(),
            serial,
            sha256,
        })
    }

    /// Whether the target is the agent id as a whole (no certificate named).
    pub fn whole_agent(&self) -> bool {
        self.serial.is_none() && self.sha256.is_none()
    }
}

impl fmt::Display for RevocationTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.whole_agent() {
            return write!(f, "agent {}", self.agent);
        }
        write!(f, "certificate of agent {}", self.agent)?;
        if let Some(s) = &self.serial {
            write!(f, " serial {s}")?;
        }
        if let Some(h) = &self.sha256 {
            write!(f, " sha256 {h}")?;
        }
        Ok(())
    }
}

impl RevocationList {
    /// Reads the file at `path`; a missing file is an empty list.
    pub fn load(path: &Path) -> Result<RevocationList, RevocationError> {
        let read_err = |source| RevocationError::Read {
            path: path.to_owned(),
            source,
        };
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(RevocationList::default())
            }
            Err(e) => return Err(read_err(e)),
        };
        let mut bytes = Vec::new();
        // One byte more than allowed tells a file at the limit from a
        // larger one without trusting its metadata.
        file.take(MAX_FILE_LEN + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_FILE_LEN {
            return Err(RevocationError::TooLarge {
                path: path.to_owned(),
                max: MAX_FILE_LEN,
            });
        }
        let text = String::from_utf8(bytes).map_err(|e| RevocationError::Parse {
            path: path.to_owned(),
            message: format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates the file's text; `path` is named in errors.
    /// Serials and fingerprints are normalized.
    pub fn parse(text: &str, path: &Path) -> Result<RevocationList, RevocationError> {
        let mut list: RevocationList =
            toml::from_str(text).map_err(|e| RevocationError::Parse {
                path: path.to_owned(),
                message: e.to_string().trim_end().replace('\n', " | "),
            })?;
        let bad = |key: String, message: String| RevocationError::Value {
            path: path.to_owned(),
            key,
            message,
        };
        if list.version != FORMAT_VERSION {
            return Err(bad(
                "version".into(),
                format!(
                    "{} is not a known version (this controller reads {FORMAT_VERSION})",
                    list.version
                ),
            ));
        }
        let check_text = |key: String, reason: &str, at: &Option<String>| {
            if reason.len() > MAX_REASON_LEN {
                return Err(bad(
                    key.clone() + ".reason",
                    format!("longer than {MAX_REASON_LEN} bytes"),
                ));
            }
            if at.as_ref().is_some_and(|t| t.len() > MAX_TIME_LEN) {
                return Err(bad(
                    key + ".revoked_at",
                    format!("longer than {MAX_TIME_LEN} bytes"),
                ));
            }
            Ok(())
        };
        for (i, a) in list.agents.iter().enumerate() {
            let key = format!("agent[{i}]");
            if !valid_id(&a.id) {
                return Err(bad(
                    format!("{key}.id"),
                    format!("{:?} is not a valid agent id", a.id),
                ));
            }
            if list.agents[..i].iter().any(|b| b.id == a.id) {
                return Err(bad(
                    format!("{key}.id"),
                    format!("{:?} appears twice", a.id),
                ));
            }
            check_text(key, &a.reason, &a.revoked_at)?;
        }
        for i in 0..list.certificates.len() {
            let key = format!("certificate[{i}]");
            let c = &mut list.certificates[i];
            if !valid_id(&c.agent) {
                return Err(bad(
                    format!("{key}.agent"),
                    format!("{:?} is not a valid agent id", c.agent),
                ));
            }
            if c.serial.is_none() && c.sha256.is_none() {
                return Err(bad(
                    key,
                    "needs sha256 or serial (to revoke every certificate of the agent, use [[agent]])"
                        .into(),
                ));
            }
            if let Some(s) = &mut c.serial {
                *s = normalize_serial(s).map_err(|m| bad(format!("{key}.serial"), m))?;
            }
            if let Some(h) = &mut c.sha256 {
                *h = normalize_sha256(h).map_err(|m| bad(format!("{key}.sha256"), m))?;
            }
            check_text(key.clone(), &c.reason, &c.revoked_at)?;
            let c = &list.certificates[i];
            if list.certificates[..i].iter().any(|d| d.same_key(c)) {
                return Err(bad(
                    key,
                    format!("the same certificate of {:?} appears twice", c.agent),
                ));
            }
        }
        Ok(list)
    }

    /// The file's text: the header, then the entries.
    pub fn to_toml(&self) -> String {
        // Serializing plain strings, integers and arrays of tables cannot
        // fail; an empty body would still leave a valid (empty) list.
        let body = toml::to_string(self).unwrap_or_default();
        format!("{HEADER}{body}")
    }

    /// Writes the list to `path` atomically: `<path>.tmp` (mode 0644),
    /// fsync, rename over `path`, fsync of the directory.
    pub fn write_atomic(&self, path: &Path) -> Result<(), RevocationError> {
        let write_err = |path: &Path, op: &'static str| {
            let path = path.to_owned();
            move |source| RevocationError::Write { path, op, source }
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(&tmp)
                .map_err(write_err(&tmp, "create"))?;
            f.write_all(self.to_toml().as_bytes())
                .map_err(write_err(&tmp, "write"))?;
            f.sync_all().map_err(write_err(&tmp, "fsync"))?;
        }
        fs::rename(&tmp, path).map_err(write_err(path, "rename into place"))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write_err(dir, "fsync the directory of"))
    }

    /// The entry that refuses `cert`, if any: an `[[agent]]` entry first.
    pub fn check(&self, cert: &PeerCertificate) -> Option<Refusal> {
        let entry = self
            .agents
            .iter()
            .find(|a| a.id == cert.agent)
            .map(|a| RevocationEntry::Agent(a.clone()))
            .or_else(|| {
                self.certificates
                    .iter()
                    .find(|c| c.matches(cert))
                    .map(|c| RevocationEntry::Certificate(c.clone()))
            })?;
        Some(Refusal {
            certificate: cert.clone(),
            entry,
        })
    }

    /// The `[[agent]]` entry of `agent`, if any.
    pub fn agent_entry(&self, agent: &str) -> Option<&RevokedAgent> {
        self.agents.iter().find(|a| a.id == agent)
    }

    /// Adds an entry for `target` (the agent as a whole, or one
    /// certificate). Returns the entry in force and whether the list
    /// changed: revoking what is already revoked keeps the first entry.
    pub fn revoke(
        &mut self,
        target: &RevocationTarget,
        reason: &str,
        revoked_at: &str,
    ) -> Result<(RevocationEntry, bool), RevocationError> {
        // The reason is optional, but it is shown in every refusal: one
        // bounded line.
        let reason = reason.trim();
        if reason.len() > MAX_REASON_LEN {
            return Err(RevocationError::Request(format!(
                "the reason is longer than {MAX_REASON_LEN} bytes"
            )));
        }
        if reason.chars().any(char::is_control) {
            return Err(RevocationError::Request(
                "the reason must be one line of text".into(),
            ));
        }
        if target.whole_agent() {
            if let Some(a) = self.agent_entry(&target.agent) {
                return Ok((RevocationEntry::Agent(a.clone()), false));
            }
            let entry = RevokedAgent {
                id: target.agent.clone(),
                reason: reason.to_owned(),
                revoked_at: Some(revoked_at.to_owned()),
            };
            self.agents.push(entry.clone());
            return Ok((RevocationEntry::Agent(entry), true));
        }
        let entry = RevokedCertificate {
            agent: target.agent.clone(),
            serial: target.serial.clone(),
            sha256: target.sha256.clone(),
            reason: reason.to_owned(),
            revoked_at: Some(revoked_at.to_owned()),
        };
        if let Some(c) = self.certificates.iter().find(|c| c.same_key(&entry)) {
            return Ok((RevocationEntry::Certificate(c.clone()), false));
        }
        self.certificates.push(entry.clone());
        Ok((RevocationEntry::Certificate(entry), true))
    }

    /// Removes the entries `target` names: the `[[agent]]` entry when no
    /// certificate is named, else the `[[certificate]]` entries of the
    /// agent whose serial and fingerprint equal the given ones. Returns
    /// what was removed (empty: nothing matched).
    pub fn unrevoke(&mut self, target: &RevocationTarget) -> Vec<RevocationEntry> {
        let mut removed = Vec::new();
        if target.whole_agent() {
            self.agents.retain(|a| {
                let hit = a.id == target.agent;
                if hit {
                    removed.push(RevocationEntry::Agent(a.clone()));
                }
                !hit
            });
        } else {
            self.certificates.retain(|c| {
                let hit = c.agent == target.agent
                    && target
                        .serial
                        .as_ref()
                        .is_none_or(|s| c.serial.as_ref() == Some(s))
                    && target
                        .sha256
                        .as_ref()
                        .is_none_or(|h| c.sha256.as_ref() == Some(h));
                if hit {
                    removed.push(RevocationEntry::Certificate(c.clone()));
                }
                !hit
            });
        }
        removed
    }
}

/// `serial` as lower-case hex without separators or leading zeros.
pub fn normalize_serial(serial: &str) -> Result<String, String> {
    let digits = hex_digits(serial)?;
    if digits.len() > MAX_SERIAL_DIGITS {
        return Err(format!("more than {MAX_SERIAL_DIGITS} hex digits"));
    }
    let trimmed = digits.trim_start_matches('0');
    Ok(if trimmed.is_empty() { "0" } else { trimmed }.to_owned())
}

/// `sha256` as 64 lower-case hex digits without separators.
pub fn normalize_sha256(sha256: &str) -> Result<String, String> {
    let digits = hex_digits(sha256)?;
    if digits.len() != 64 {
        return Err(format!(
            "a SHA-256 fingerprint has 64 hex digits, this has {}",
            digits.len()
        ));
    }
    Ok(digits)
}

/// Hex digits of `s` in lower case; `:` separators and surrounding blanks
/// are dropped, anything else that is not a hex digit is an error.
fn hex_digits(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.len() > 256 {
        return Err("too long".into());
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            ':' => {}
            c if c.is_ascii_hexdigit() => out.push(c.to_ascii_lowercase()),
            c => return Err(format!("{s:?}: {c:?} is not a hex digit")),
        }
    }
    if out.is_empty() {
        return Err("no hex digits".into());
    }
    Ok(out)
}

/// The revocation list in force, shared by the TLS verifier, the
/// connections and the admin interface, and the file it comes from.
#[derive(Debug)]
pub struct Revocations {
    path: PathBuf,
    current: RwLock<Arc<RevocationList>>,
    /// Serializes read-modify-write cycles of the file (admin edits and
    /// reloads).
    edits: Mutex<()>,
}

impl Revocations {
    /// Loads the list at `path` (missing: empty).
    pub fn load(path: &Path) -> Result<Revocations, RevocationError> {
        let list = RevocationList::load(path)?;
        Ok(Revocations {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(list)),
            edits: Mutex::new(()),
        })
    }

    /// An empty list kept in `path` (nothing is read).
    pub fn empty(path: &Path) -> Revocations {
        Revocations {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(RevocationList::default())),
            edits: Mutex::new(()),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The list in force.
    pub fn current(&self) -> Arc<RevocationList> {
        // A panic while replacing an Arc cannot leave it half-written.
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The entry that refuses `cert`, if any.
    pub fn check(&self, cert: &PeerCertificate) -> Option<Refusal> {
        self.current().check(cert)
    }

    fn install(&self, list: RevocationList) -> Arc<RevocationList> {
        let list = Arc::new(list);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = list.clone();
        list
    }

    /// Reads the file again and puts it in force. On error the list in
    /// force stays, and the error says why.
    pub fn reload(&self) -> Result<Arc<RevocationList>, RevocationError> {
        let _edit = self.edits.lock().unwrap_or_else(|p| p.into_inner());
        let list = RevocationList::load(&self.path)?;
        Ok(self.install(list))
    }

    /// Reads the file, lets `change` edit the list, writes the file
    /// atomically if the list changed, and puts the file's list in force.
    /// A file that does not load is not overwritten: the error names it.
    pub fn edit<T>(
        &self,
        change: impl FnOnce(&mut RevocationList) -> Result<T, RevocationError>,
    ) -> Result<T, RevocationError> {
        let _edit = self.edits.lock().unwrap_or_else(|p| p.into_inner());
        let before = RevocationList::load(&self.path)?;
        let mut list = before.clone();
        let out = change(&mut list)?;
        if list != before {
            list.write_atomic(&self.path)?;
        }
        self.install(list);
        Ok(out)
    }
}

/// `time` as RFC 3339 UTC, e.g. `2024-06-10T12:00:00Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cert(agent: &str, serial: &str, sha: char) -> PeerCertificate {
        PeerCertificate {
            agent: agent.into(),
            serial: serial.into(),
            sha256: sha.to_string().repeat(64),
        }
    }

    const EXAMPLE: &str = r#"
version = 1
[[agent]]
id = "web-1"
reason = "decommissioned"
revoked_at = "2024-06-10T12:00:00Z"

[[certificate]]
agent = "web-2"
sha256 = "AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA"
reason = "laptop stolen"

[[certificate]]
agent = "web-3"
serial = "00:3A:5F"
"#;

    #[test]
    fn parses_and_normalizes_the_documented_format() {
        let l = RevocationList::parse(EXAMPLE, Path::new("r.toml")).unwrap();
        assert_eq!(l.agents.len(), 1);
        assert_eq!(l.certificates[0].sha256.as_deref(), Some(&*"a".repeat(64)));
        assert_eq!(l.certificates[1].serial.as_deref(), Some("3a5f"));
        assert_eq!(l.certificates[1].reason, "");
        // An empty file is an empty list of the current version.
        assert_eq!(
            RevocationList::parse("", Path::new("r.toml")).unwrap(),
            RevocationList::default()
        );
    }

    #[test]
    fn agent_entries_refuse_every_certificate_of_the_id() {
        let l = RevocationList::parse(EXAMPLE, Path::new("r.toml")).unwrap();
        let r = l.check(&cert("web-1", "1", 'b')).unwrap();
        assert!(matches!(r.entry, RevocationEntry::Agent(_)));
        let text = r.to_string();
        assert!(
            text.contains("agent web-1") && text.contains("decommissioned"),
            "{text}"
        );
        assert!(l.check(&cert("web-1", "2", 'c')).is_some());
        assert!(l.check(&cert("web-10", "1", 'b')).is_none());
    }

    #[test]
    fn certificate_entries_refuse_only_that_certificate() {
        let l = RevocationList::parse(EXAMPLE, Path::new("r.toml")).unwrap();
        // By fingerprint: a re-issued certificate of web-2 is not refused.
        assert!(l.check(&cert("web-2", "77", 'a')).is_some());
        assert!(l.check(&cert("web-2", "77", 'b')).is_none());
        // By serial.
        let r = l.check(&cert("web-3", "3a5f", 'c')).unwrap();
        assert!(r.to_string().contains("no reason given"), "{r}");
        assert!(l.check(&cert("web-3", "3a60", 'c')).is_none());
        // The same fingerprint under another CN is another certificate.
        assert!(l.check(&cert("web-4", "77", 'a')).is_none());
    }

    #[test]
    fn errors_name_the_file_and_the_entry() {
        let p = Path::new("/etc/tideline/revoked.toml");
        let cases: &[(&str, &str)] = &[
            ("[[agent]]\nid = \"bad id\"\n", "agent[0].id"),
            ("[[agent]]\nid = \"a\"\n[[agent]]\nid = \"a\"\n", "appears twice"),
            ("[[certificate]]\nagent = \"a\"\n", "certificate[0]: needs sha256 or serial"),
            ("[[certificate]]\nagent = \"a\"\nsha256 = \"abc\"\n", "certificate[0].sha256"),
            ("[[certificate]]\nagent = \"a\"\nserial = \"xyz\"\n", "certificate[0].serial"),
            ("[[certificate]]\nagent = \"a\"\nserial = \"1\"\n[[certificate]]\nagent = \"a\"\nserial = \"01\"\n", "appears twice"),
            ("[[agent]]\nid = \"a\"\ncolour = \"red\"\n", "colour"),
            ("version = 2\n", "version"),
            ("this is not toml", "revoked.toml"),
        ];
        for (text, needle) in cases {
            let e = RevocationList::parse(text, p).unwrap_err().to_string();
            assert!(e.contains("/etc/tideline/revoked.toml"), "{e}");
            assert!(e.contains(needle), "{text:?}: {e}");
        }
        let long = format!(
            "[[agent]]\nid = \"a\"\nreason = \"{}\"\n",
            "x".repeat(MAX_REASON_LEN + 1)
        );
        let e = RevocationList::parse(&long, p).unwrap_err().to_string();
        assert!(e.contains("agent[0].reason"), "{e}");
    }

    #[test]
    fn load_reads_missing_as_empty_and_bounds_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("revoked.toml");
        assert_eq!(RevocationList::load(&p).unwrap(), RevocationList::default());
        let f = File::create(&p).unwrap();
        f.set_len(MAX_FILE_LEN + 1).unwrap();
        assert!(matches!(
            RevocationList::load(&p),
            Err(RevocationError::TooLarge { .. })
        ));
        fs::write(&p, [0xff, 0xfe]).unwrap();
        let e = RevocationList::load(&p).unwrap_err().to_string();
        assert!(e.contains("UTF-8") && e.contains("revoked.toml"), "{e}");
    }

    #[test]
    fn revoke_and_unrevoke_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("revoked.toml");
        let r = Revocations::load(&p).unwrap();
        let whole = RevocationTarget::new("web-1", None, None).unwrap();
        let one = RevocationTarget::new("web-2", Some("0A"), Some(&"B".repeat(64))).unwrap();
        let (_, changed) = r
            .edit(|l| l.revoke(&whole, "decommissioned", "t1"))
            .unwrap();
        assert!(changed);
        let (entry, changed) = r.edit(|l| l.revoke(&whole, "again", "t2")).unwrap();
        assert!(!changed, "revoking twice keeps the first entry");
        assert_eq!(entry.reason(), "decommissioned");
        r.edit(|l| l.revoke(&one, "key leaked", "t3")).unwrap();

        // The file alone holds the list: a fresh load sees both entries,
        // and the text is the documented format with its header.
        let text = fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("# Revoked agents"), "{text}");
        assert!(
            text.contains("[[agent]]") && text.contains("[[certificate]]"),
            "{text}"
        );
        let again = RevocationList::load(&p).unwrap();
        assert_eq!(again, *r.current());
        assert_eq!(again.certificates[0].serial.as_deref(), Some("a"));
        assert!(again.check(&cert("web-2", "a", 'b')).is_some());

        let removed = r.edit(|l| Ok(l.unrevoke(&whole))).unwrap();
        assert_eq!(removed.len(), 1);
        assert!(r.edit(|l| Ok(l.unrevoke(&whole))).unwrap().is_empty());
        // A certificate entry is removed by either of its keys.
        let by_serial = RevocationTarget::new("web-2", Some("a"), None).unwrap();
        assert_eq!(r.edit(|l| Ok(l.unrevoke(&by_serial))).unwrap().len(), 1);
        assert_eq!(RevocationList::load(&p).unwrap(), RevocationList::default());
        assert!(!dir.path().join("revoked.toml.tmp").exists());
    }

    #[test]
    fn requests_are_checked() {
        assert!(RevocationTarget::new("bad id", None, None).is_err());
        assert!(RevocationTarget::new("a", Some("zz"), None).is_err());
        assert!(RevocationTarget::new("a", None, Some("abcd")).is_err());
        let t = RevocationTarget::new("a", None, None).unwrap();
        let mut l = RevocationList::default();
        assert!(l.revoke(&t, "two\nlines", "t").is_err());
        assert!(l.revoke(&t, &"x".repeat(MAX_REASON_LEN + 1), "t").is_err());
        assert_eq!(l, RevocationList::default());
    }

    #[test]
    fn a_broken_file_is_neither_overwritten_nor_put_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("revoked.toml");
        let r = Revocations::load(&p).unwrap();
        let t = RevocationTarget::new("web-1", None, None).unwrap();
        r.edit(|l| l.revoke(&t, "gone", "t")).unwrap();
        fs::write(&p, "[[agent]\nid = ").unwrap();
        let e = r.reload().unwrap_err().to_string();
        assert!(e.contains("revoked.toml"), "{e}");
        assert!(
            r.current().agent_entry("web-1").is_some(),
            "the old list stays"
        );
        let e = r
            .edit(|l| l.revoke(&RevocationTarget::new("web-2", None, None)?, "x", "t"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid revocation list"), "{e}");
        assert_eq!(fs::read_to_string(&p).unwrap(), "[[agent]\nid = ");
        // A hand edit that parses is put in force by reload.
        fs::write(&p, "[[agent]]\nid = \"web-9\"\n").unwrap();
        r.reload().unwrap();
        assert!(r.current().agent_entry("web-9").is_some());
        assert!(r.current().agent_entry("web-1").is_none());
    }

    #[test]
    fn a_write_that_fails_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("revoked.toml");
        let r = Revocations::load(&p).unwrap();
        let t = RevocationTarget::new("web-1", None, None).unwrap();
        r.edit(|l| l.revoke(&t, "gone", "t")).unwrap();
        let before = fs::read_to_string(&p).unwrap();
        // The temporary file's name is taken by a directory: create fails.
        fs::create_dir(dir.path().join("revoked.toml.tmp")).unwrap();
        let t2 = RevocationTarget::new("web-2", None, None).unwrap();
        let e = r.edit(|l| l.revoke(&t2, "gone", "t")).unwrap_err();
        assert!(matches!(e, RevocationError::Write { .. }), "{e}");
        assert!(e.to_string().contains("revoked.toml.tmp"), "{e}");
        assert_eq!(fs::read_to_string(&p).unwrap(), before);
        assert!(r.current().agent_entry("web-2").is_none());
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_718_020_800)),
            "2024-06-10T12:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400 + 86_399)),
            "2000-02-29T23:59:59Z"
        );
    }
}
