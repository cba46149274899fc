//! The controller's configuration file (`/etc/tideline/controller.toml`).
//!
//! Every key is documented in `docs/operations.md`; unknown keys are errors.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use tideline_protocol::limits::valid_id;

/// `[log]`: shared with the agent, see `tideline_service::log`.
pub use tideline_service::log::LogSection;

/// Default location of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tideline/controller.toml";
/// Default admin socket.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/tideline/controller.sock";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not valid TOML for this schema (the message names key and line).
    #[error("invalid configuration {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// A value is out of its domain.
    #[error("invalid configuration {path}: {key}: {message}")]
    Value {
        /// File.
        path: PathBuf,
        /// Dotted key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole controller configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// Where agents connect.
    #[serde(default)]
    pub listen: ListenSection,
    /// Certificates for mutual TLS.
    pub tls: TlsSection,
    /// Recovery point store.
    pub store: StoreSection,
    /// Admin interface.
    #[serde(default)]
    pub admin: AdminSection,
    /// Sync schedule and session policy.
    #[serde(default)]
    pub schedule: ScheduleSection,
    /// Serving points over NBD.
    #[serde(default)]
    pub serve: ServeSection,
    /// Per-agent settings.
    #[serde(default, rename = "agent")]
    pub agents: Vec<AgentSection>,
    /// Logging: level and GELF export, the same keys as the agent's.
    #[serde(default)]
    pub log: LogSection,
}

/// `[listen]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    /// `address:port` to accept agents on.
    #[serde(default = "default_listen")]
    pub address: String,
    /// Seconds between heartbeats; a link is dropped after three missed.
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: u64,
}

impl Default for ListenSection {
    fn default() -> Self {
        ListenSection {
            address: default_listen(),
            heartbeat_secs: default_heartbeat_secs(),
        }
    }
}

/// `[tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// CA that issued the agents' certificates (PEM).
    pub ca: PathBuf,
    /// The controller's certificate (PEM).
    pub cert: PathBuf,
    /// The controller's key (PEM).
    pub key: PathBuf,
    /// The revocation list (see [`crate::revocation`]); default
    /// `<store.dir>/revoked.toml`, see [`ControllerConfig::revocation_file`].
    #[serde(default)]
    pub revoked: Option<PathBuf>,
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// Store directory.
    pub dir: PathBuf,
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Unix socket of the admin interface (created with mode 0600).
    #[serde(default = "default_admin_socket")]
    pub socket: PathBuf,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            socket: default_admin_socket(),
        }
    }
}

/// `[serve]`: points served as NBD exports (`serve-point`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeSection {
    /// Directory of the exports' Unix sockets (created with mode 0700);
    /// default `exports/` next to the admin socket.
    pub dir: Option<PathBuf>,
    /// TTL of an export when the request names none (default 3600).
    pub ttl_secs: Option<u64>,
}

/// `[schedule]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    /// Seconds between scheduled syncs of every agent (the RPO); 0 = only
    /// on demand.
    #[serde(default)]
    pub interval_secs: u64,
    /// How long an interrupted session waits for its agent to come back
    /// and resume before it is abandoned.
    #[serde(default = "default_resume_window")]
    pub resume_window_secs: u64,
}

impl Default for ScheduleSection {
    fn default() -> Self {
        ScheduleSection {
            interval_secs: 0,
            resume_window_secs: default_resume_window(),
        }
    }
}

/// `[[agent]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// Agent id (the CN of its certificate).
    pub id: String,
    /// Seconds between scheduled syncs of this agent (overrides
    /// `schedule.interval_secs`; 0 = only on demand).
    pub interval_secs: Option<u64>,
}

fn default_listen() -> String {
    "0.0.0.0:443".into()
}
fn default_heartbeat_secs() -> u64 {
    15
}
fn default_admin_socket() -> PathBuf {
    PathBuf::from(DEFAULT_ADMIN_SOCKET)
}
fn default_resume_window() -> u64 {
    600
}

impl ControllerConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<ControllerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses configuration text; relative paths are taken from the file's
    /// directory.
    pub fn parse(text: &str, path: &Path) -> Result<ControllerConfig, ConfigError> {
        let mut cfg: ControllerConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " | "),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.tls.ca,
            &mut cfg.tls.cert,
            &mut cfg.tls.key,
            &mut cfg.store.dir,
            &mut cfg.admin.socket,
        ]
        .into_iter()
        .chain(cfg.tls.revoked.as_mut())
        .chain(cfg.serve.dir.as_mut())
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        let bad = |key: String, message: String| ConfigError::Value {
            path: path.to_owned(),
            key,
            message,
        };
        if cfg.listen.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(bad(
                "listen.address".into(),
                format!("{:?} is not an address:port", cfg.listen.address),
            ));
        }
        if cfg.listen.heartbeat_secs == 0 {
            return Err(bad(
                "listen.heartbeat_secs".into(),
                "must be at least 1".into(),
            ));
        }
        if let Some(t) = cfg.serve.ttl_secs {
            if t == 0 || t > crate::serve::exports::MAX_TTL_SECS {
                return Err(bad(
                    "serve.ttl_secs".into(),
                    format!(
                        "must be between 1 and {}",
                        crate::serve::exports::MAX_TTL_SECS
                    ),
                ));
            }
        }
        if let Err(e) = cfg.log.validate() {
            return Err(bad(e.key.into(), e.message));
        }
        for (i, a) in cfg.agents.iter().enumerate() {
            if !valid_id(&a.id) {
                return Err(bad(
                    format!("agent[{i}].id"),
                    format!("{:?} is not a valid agent id", a.id),
                ));
            }
        }
        Ok(cfg)
    }

    /// The revocation list: `[tls] revoked`, else `revoked.toml` in the
    /// store directory (writable by the controller, which rewrites the
    /// file for `revoke` and `unrevoke`).
    pub fn revocation_file(&self) -> PathBuf {
        self.tls
            .revoked
            .clone()
            .unwrap_or_else(|| self.store.dir.join(crate::revocation::DEFAULT_FILE_NAME))
    }

    /// Directory of the NBD export sockets: `[serve] dir`, else
    /// `exports/` next to the admin socket.
    pub fn serve_dir(&self) -> PathBuf {
        self.serve.dir.clone().unwrap_or_else(|| {
            self.admin
                .socket
                .parent()
                .unwrap_or(Path::new("/run/tideline"))
                .join("exports")
        })
    }

    /// Default TTL of an NBD export.
    pub fn serve_ttl_secs(&self) -> u64 {
        self.serve.ttl_secs.unwrap_or(3600)
    }

    /// Scheduled interval for `agent`, if any.
    pub fn interval_for(&self, agent: &str) -> Option<u64> {
        let v = self
            .agents
            .iter()
            .find(|a| a.id == agent)
            .and_then(|a| a.interval_secs)
            .unwrap_or(self.schedule.interval_secs);
        (v > 0).then_some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_with_defaults_and_overrides() {
        let text = r#"
[tls]
ca = "ca.crt"
cert = "c.crt"
key = "c.key"
[store]
dir = "store"
[schedule]
interval_secs = 3600
[[agent]]
id = "web-1"
interval_secs = 60
"#;
        let c = ControllerConfig::parse(text, Path::new("/etc/t/controller.toml")).unwrap();
        assert_eq!(c.listen.address, "0.0.0.0:443");
        assert_eq!(c.store.dir, PathBuf::from("/etc/t/store"));
        assert_eq!(c.interval_for("web-1"), Some(60));
        assert_eq!(c.interval_for("other"), Some(3600));
        assert_eq!(
            c.revocation_file(),
            PathBuf::from("/etc/t/store/revoked.toml")
        );
    }

    #[test]
    fn revocation_file_is_taken_from_the_files_directory() {
        let text =
            "[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\nrevoked=\"deny.toml\"\n[store]\ndir=\"s\"\n";
        let c = ControllerConfig::parse(text, Path::new("/etc/t/controller.toml")).unwrap();
        assert_eq!(c.revocation_file(), PathBuf::from("/etc/t/deny.toml"));
    }

    #[test]
    fn unknown_key_is_reported() {
        let e = ControllerConfig::parse(
            "[store]\ndir=\"x\"\nsize=1\n[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("size"), "{e}");
    }

    #[test]
    fn log_section_is_accepted_and_checked() {
        let base = "[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n[store]\ndir=\"s\"\n";
        let c = ControllerConfig::parse(
            &format!("{base}[log]\nlevel=\"debug\"\ngelf_address=\"127.0.0.1:12201\"\ngelf_compression=\"gzip\"\n"),
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(c.log.level.as_deref(), Some("debug"));
        assert_eq!(c.log.gelf_address.as_deref(), Some("127.0.0.1:12201"));
        assert_eq!(c.log.gelf_compression, "gzip");
        let e =
            ControllerConfig::parse(&format!("{base}[log]\ngelf_queue=0\n"), Path::new("c.toml"))
                .unwrap_err()
                .to_string();
        assert!(e.contains("log.gelf_queue"), "{e}");
    }
}
