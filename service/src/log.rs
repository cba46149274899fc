//! The `[log]` section shared by the agent's and the controller's
//! configuration files, and the subscriber it describes: a filter, plain
//! text on stderr (the journal), and optionally the [`gelf`](crate::gelf)
//! layer. Keeping the keys here means both daemons accept the same keys with
//! the same defaults and the same checks (`docs/operations.md`, `[log]`).

use serde::Deserialize;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::gelf::{self, Compression, GelfConfig, GelfError, GelfHandle, GelfLayer};

/// `[log]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, or a
    /// `tracing` directive list); `RUST_LOG` overrides it. Default `info`.
    #[serde(default)]
    pub level: Option<String>,
    /// GELF server `host[:port]` (UDP, port 12201 by default); none: no
    /// GELF export.
    #[serde(default)]
    pub gelf_address: Option<String>,
    /// Largest GELF datagram in bytes, chunk header included (512..=65000).
    #[serde(default = "default_gelf_chunk")]
    pub gelf_chunk_size: usize,
    /// GELF payload compression: `none`, `gzip` or `zlib`.
    #[serde(default = "default_gelf_compression")]
    pub gelf_compression: String,
    /// Messages queued for the GELF sender before new ones are dropped (and
    /// counted).
    #[serde(default = "default_gelf_queue")]
    pub gelf_queue: usize,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: None,
            gelf_address: None,
            gelf_chunk_size: default_gelf_chunk(),
            gelf_compression: default_gelf_compression(),
            gelf_queue: default_gelf_queue(),
        }
    }
}

fn default_gelf_chunk() -> usize {
    gelf::DEFAULT_CHUNK_SIZE
}
fn default_gelf_compression() -> String {
    "none".into()
}
fn default_gelf_queue() -> usize {
    gelf::DEFAULT_QUEUE
}

/// A `[log]` value out of its domain: the dotted key and what is wrong, for
/// the caller to wrap in its own configuration error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct LogValueError {
    /// Dotted key, e.g. `log.gelf_queue`.
    pub key: &'static str,
    /// What is wrong.
    pub message: String,
}

impl LogSection {
    /// Checks every value without touching the network (the address is
    /// resolved when logging starts).
    pub fn validate(&self) -> Result<(), LogValueError> {
        if self.compression().is_none() {
            return Err(LogValueError {
                key: "log.gelf_compression",
                message: format!("{:?} is not none, gzip or zlib", self.gelf_compression),
            });
        }
        if !(gelf::MIN_CHUNK_SIZE..=gelf::MAX_CHUNK_SIZE).contains(&self.gelf_chunk_size) {
            return Err(LogValueError {
                key: "log.gelf_chunk_size",
                message: format!(
                    "{} is outside {}..={}",
                    self.gelf_chunk_size,
                    gelf::MIN_CHUNK_SIZE,
                    gelf::MAX_CHUNK_SIZE
                ),
            });
        }
        if self.gelf_queue == 0 {
            return Err(LogValueError {
                key: "log.gelf_queue",
                message: "must be at least 1".into(),
            });
        }
        Ok(())
    }

    /// `gelf_compression` as a [`Compression`], `None` when unknown.
    fn compression(&self) -> Option<Compression> {
        match self.gelf_compression.as_str() {
            "none" => Some(Compression::None),
            "gzip" => Some(Compression::Gzip),
            "zlib" => Some(Compression::Zlib),
            _ => None,
        }
    }

    /// The GELF settings this section asks for, `None` when
    /// `gelf_address` is unset. `static_fields` are added to every message
    /// (e.g. `("component", "controller")`, sent as `_component`).
    pub fn gelf_config(&self, static_fields: Vec<(String, String)>) -> Option<GelfConfig> {
        let address = self.gelf_address.clone()?;
        Some(GelfConfig {
            address,
            chunk_size: self.gelf_chunk_size,
            // validate() refuses unknown names; an unvalidated section
            // falls back to plain JSON rather than failing here.
            compression: self.compression().unwrap_or_default(),
            queue: self.gelf_queue,
            static_fields,
            ..GelfConfig::default()
        })
    }
}

/// Handles on a subscriber installed by [`init`].
pub struct Logging {
    /// Counters and flush of the GELF layer, when there is one.
    pub gelf: Option<GelfHandle>,
    /// Replaces the filter at run time (e.g. on SIGHUP).
    pub filter: tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>,
}

/// Installs the process's global subscriber: `RUST_LOG` or `section.level`
/// (default `info`), text on stderr (colours only on a terminal), and GELF
/// when `section.gelf_address` is set. Fails when the GELF address does not
/// resolve or its settings are invalid; panics if a global subscriber is
/// already installed (call once, from `main`).
pub fn init(
    section: &LogSection,
    static_fields: Vec<(String, String)>,
) -> Result<Logging, GelfError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::new(v),
        _ => EnvFilter::new(section.level.as_deref().unwrap_or("info")),
    };
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let (layer, handle) = match section.gelf_config(static_fields) {
        Some(cfg) => {
            let (layer, handle) = GelfLayer::new(cfg)?;
            (Some(layer), Some(handle))
        }
        None => (None, None),
    };
    let (filter, filter_handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(layer)
        .init();
    Ok(Logging {
        gelf: handle,
        filter: filter_handle,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_export_nothing() {
        let s = LogSection::default();
        assert_eq!(s.validate(), Ok(()));
        assert!(s.gelf_config(Vec::new()).is_none());
    }

    #[test]
    fn bad_values_name_their_key() {
        let bad = |f: fn(&mut LogSection)| {
            let mut s = LogSection::default();
            f(&mut s);
            s.validate().unwrap_err().key
        };
        assert_eq!(
            bad(|s| s.gelf_compression = "lz4".into()),
            "log.gelf_compression"
        );
        assert_eq!(bad(|s| s.gelf_chunk_size = 100), "log.gelf_chunk_size");
        assert_eq!(bad(|s| s.gelf_queue = 0), "log.gelf_queue");
    }

    #[test]
    fn gelf_config_carries_every_key() {
        let s = LogSection {
            level: None,
            gelf_address: Some("graylog:12201".into()),
            gelf_chunk_size: 8000,
            gelf_compression: "zlib".into(),
            gelf_queue: 7,
        };
        let c = s
            .gelf_config(vec![("component".into(), "controller".into())])
            .expect("address set");
        assert_eq!(c.address, "graylog:12201");
        assert_eq!(c.chunk_size, 8000);
        assert_eq!(c.compression, Compression::Zlib);
        assert_eq!(c.queue, 7);
        assert_eq!(
            c.static_fields,
            vec![("component".into(), "controller".into())]
        );
    }
}
