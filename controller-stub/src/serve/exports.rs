//! The live NBD exports: one Unix socket per export, `nbd-<id>.sock` in
//! the serve directory (`[serve] dir`, by default `exports/` next to the
//! admin socket). The directory is created with mode 0700 and each socket
//! set to 0600: whoever can connect reads the disk.
//!
//! An export lives until it is stopped, until its TTL runs out, or until
//! the controller stops; then its socket is removed and its connections
//! are closed (after the request each is serving). Exports do not survive
//! a restart: stale sockets are removed when the registry starts.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::net::UnixListener;
use tokio::sync::watch;

use super::conn::{self, stopped};
use super::handshake::ExportDescription;
use super::image::PointImage;
use crate::registry::unix_now;
use crate::store::{PointId, Store, StoreError};

/// Most connections one export serves at once (clients open a few each
/// for multi-conn); more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 32;

/// Longest TTL accepted (30 days).
pub const MAX_TTL_SECS: u64 = 30 * 24 * 3600;

/// Why an export did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The point cannot be read (absent, or its index fails its checks).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The TTL is zero or longer than [`MAX_TTL_SECS`].
    #[error("ttl must be between 1 and {MAX_TTL_SECS} seconds, not {0}")]
    BadTtl(u64),
    /// The task loading the index failed.
    #[error("loading the point's index failed: {0}")]
    Task(String),
    /// The socket could not be created.
    #[error("cannot create NBD socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// What the admin interface shows of an export.
#[derive(Debug, Clone, Serialize)]
pub struct ExportInfo {
    /// Export id.
    pub id: u64,
    /// Agent id.
    pub agent: String,
    /// Disk id.
    pub disk: String,
    /// Point id.
    pub point: PointId,
    /// Export name (`agent/disk/point`; the empty name works too).
    pub name: String,
    /// The Unix socket.
    pub socket: PathBuf,
    /// NBD URI for libnbd tools and qemu.
    pub uri: String,
    /// Size in bytes.
    pub size: u64,
    /// The point's block size.
    pub block_size: u32,
    /// Unix time it started.
    pub started_unix: u64,
    /// Unix time its TTL ends.
    pub expires_unix: u64,
    /// Connections open now.
    pub connections: usize,
}

struct LiveExport {
    info: ExportInfo,
    connections: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
}

/// The registry of live exports.
pub struct Exports {
    dir: PathBuf,
    next_id: AtomicU64,
    live: Mutex<BTreeMap<u64, LiveExport>>,
}

impl Exports {
    /// A registry whose sockets go in `dir` (nothing is created yet).
    pub fn new(dir: PathBuf) -> Exports {
        Exports {
            dir,
            next_id: AtomicU64::new(1),
            live: Mutex::new(BTreeMap::new()),
        }
    }

    /// The socket directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn live(&self) -> MutexGuard<'_, BTreeMap<u64, LiveExport>> {
        // The map stays consistent across a panic elsewhere: recover it.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates the socket directory (mode 0700) and removes sockets a
    /// previous run left behind.
    pub fn prepare_dir(&self) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("nbd-") && name.ends_with(".sock") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// Starts serving point `point` of `agent`/`disk` for `ttl`. Loads and
    /// checks the point's index first (on the blocking pool).
    pub async fn start(
        self: &Arc<Self>,
        store: Arc<Store>,
        agent: &str,
        disk: &str,
        point: PointId,
        ttl_secs: u64,
    ) -> Result<ExportInfo, ServeError> {
        if ttl_secs == 0 || ttl_secs > MAX_TTL_SECS {
            return Err(ServeError::BadTtl(ttl_secs));
        }
        let (a, d) = (agent.to_string(), disk.to_string());
        let image = tokio::task::spawn_blocking(move || PointImage::load(store, &a, &d, point))
            .await
            .map_err(|e| ServeError::Task(e.to_string()))??;
        let image = Arc::new(image);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let socket = self.dir.join(format!("nbd-{id}.sock"));
        let listener = bind(&socket).map_err(|source| ServeError::Socket {
            path: socket.clone(),
            source,
        })?;
        let now = unix_now();
        let info = ExportInfo {
            id,
            agent: agent.to_string(),
            disk: disk.to_string(),
            point,
            name: format!("{agent}/{disk}/{point}"),
            uri: format!("nbd+unix:///?socket={}", socket.display()),
            socket: socket.clone(),
            size: image.size(),
            block_size: image.geometry.block_size,
            started_unix: now,
            expires_unix: now + ttl_secs,
            connections: 0,
        };
        let (stop, stop_rx) = watch::channel(false);
        let connections = Arc::new(AtomicUsize::new(0));
        self.live().insert(
            id,
            LiveExport {
                info: info.clone(),
                connections: connections.clone(),
                stop,
            },
        );
        tracing::info!(
            export = id,
            agent,
            disk,
            point,
            socket = %socket.display(),
            ttl_secs,
            "serving point over NBD"
        );
        let description = ExportDescription {
            name: info.name.clone(),
            description: format!("Tideline point {point} of {agent}/{disk} (read-only)"),
            size: image.size(),
            block_size: image.geometry.block_size,
        };
        tokio::spawn(accept_loop(
            self.clone(),
            id,
            listener,
            image,
            description,
            Duration::from_secs(ttl_secs),
            connections,
            stop_rx,
        ));
        Ok(info)
    }

    /// The live exports, by id.
    pub fn list(&self) -> Vec<ExportInfo> {
        self.live()
            .values()
            .map(|e| ExportInfo {
                connections: e.connections.load(Ordering::Relaxed),
                ..e.info.clone()
            })
            .collect()
    }

    /// Stops export `id`; false if there is none. Its socket is removed
    /// before this returns; connections close after their current request.
    pub fn stop(&self, id: u64) -> bool {
        let Some(e) = self.live().remove(&id) else {
            return false;
        };
        close(&e, "stopped");
        true
    }

    /// Stops every export (controller shutdown).
    pub fn stop_all(&self) {
        let all = std::mem::take(&mut *self.live());
        for e in all.values() {
            close(e, "controller stopping");
        }
    }
}

fn close(e: &LiveExport, why: &str) {
    let _ = std::fs::remove_file(&e.info.socket);
    let _ = e.stop.send(true);
    tracing::info!(export = e.info.id, agent = %e.info.agent, disk = %e.info.disk, point = e.info.point, why, "NBD export closed");
}

/// Binds `socket` inside the 0700 directory, then narrows it to 0600.
fn bind(socket: &Path) -> io::Result<UnixListener> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

#[allow(clippy::too_many_arguments)]
async fn accept_loop(
    exports: Arc<Exports>,
    id: u64,
    listener: UnixListener,
    image: Arc<PointImage>,
    description: ExportDescription,
    ttl: Duration,
    connections: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) {
    let expires = tokio::time::sleep(ttl);
    tokio::pin!(expires);
    let conn_stop = stop.clone();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) if connections.load(Ordering::Relaxed) >= MAX_CONNECTIONS => {
                    tracing::warn!(export = id, limit = MAX_CONNECTIONS, "NBD connection refused: too many connections");
                    drop(stream);
                }
                Ok((stream, _)) => {
                    let (image, description, stop) = (image.clone(), description.clone(), conn_stop.clone());
                    let connections = connections.clone();
                    connections.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        if let Err(e) = conn::serve(stream, image.clone(), description, stop).await {
                            tracing::warn!(export = id, agent = %image.agent, disk = %image.disk, point = image.point, error = %e, "NBD connection ended with an error");
                        }
                        connections.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                Err(e) => {
                    tracing::warn!(export = id, error = %e, "NBD accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = &mut expires => {
                let e = exports.live().remove(&id);
                if let Some(e) = e {
                    close(&e, "ttl expired");
                }
                return;
            }
            _ = stopped(&mut stop) => return,
        }
    }
}
