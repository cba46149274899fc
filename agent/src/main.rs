//! `tideline-agent`: the replication agent daemon and its admin commands.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tideline_agent::config::{AgentConfig, DEFAULT_CONFIG_PATH};
use tideline_agent::service::notify::{status_assignment, watchdog_interval};
use tideline_agent::service::status_file::{self, StatusFile};
use tideline_agent::service::{run_watchdog, Heartbeat, Notifier};
use tideline_agent::transport::connection;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "tideline-agent",
    version,
    about = "Tideline disaster-recovery replication agent"
)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, global = true, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: dial the controller and answer its sessions (default).
    Run,
    /// Validate the configuration and exit.
    CheckConfig,
    /// Print the disks the agent would report, as JSON.
    Inventory,
    /// Show what the running agent is doing, per disk: last committed point,
    /// RPO lag, progress and ETA, last error.
    Status {
        /// Print the status document as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a disk as the agent reads it (raw file, block device, .vmdk or
    /// nbd:// URI) to a sparse raw image, to compare with other tools.
    Dump {
        /// Disk location, as in `[[disk]] path`.
        #[arg(long)]
        path: PathBuf,
        /// Output raw image.
        #[arg(long)]
        out: PathBuf,
        /// Reader threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// The thaw guard the agent starts to hold a filesystem freeze
    /// (`consistency::guard`); not for direct use.
    #[command(name = "freeze-guard", hide = true)]
    FreezeGuard(tideline_agent::consistency::guard::GuardArgs),
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("tideline-agent: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Command::FreezeGuard(args)) = &cli.command {
        std::process::exit(tideline_agent::consistency::guard::main(args));
    }
    if let Some(Command::Dump { path, out, threads }) = &cli.command {
        let started = std::time::Instant::now();
        let source = tideline_agent::source::open(path)?;
        let stats = tideline_agent::dump::dump(&*source, out, *threads)
            .with_context(|| format!("dumping {} to {}", path.display(), out.display()))?;
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({"size": stats.size, "bytes_read": stats.bytes_read, "seconds": secs})
        );
        return Ok(());
    }
    let cfg = AgentConfig::load(&cli.config)?;
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            tideline_agent::transport::tls::client_config(
                &cfg.tls.ca,
                &cfg.tls.cert,
                &cfg.tls.key,
            )?;
            for d in &cfg.disks {
                tideline_agent::source::open(&d.path)
                    .with_context(|| format!("disk {:?}", d.id))?;
            }
            println!("{}: ok ({} disks)", cli.config.display(), cfg.disks.len());
            Ok(())
        }
        Command::Inventory => {
            let inv = connection::inventory(&cfg);
            let disks: Vec<_> = inv
                .disks
                .iter()
                .map(
                    |d| serde_json::json!({"id": d.id, "size": d.size, "block_size": d.block_size}),
                )
                .collect();
            println!("{}", serde_json::to_string_pretty(&disks)?);
            Ok(())
        }
        Command::Run => run(cfg, &cli.config),
        Command::Status { json } => show_status(&cfg, json),
        Command::Dump { .. } | Command::FreezeGuard(_) => Ok(()),
    }
}

fn run(cfg: AgentConfig, config_path: &std::path::Path) -> Result<()> {
    // Certificate, key and CA that cannot work never will: refuse them now,
    // before systemd is told we are ready, rather than retry forever. (The
    // files are read again for every connection, so renewed certificates
    // are taken from the next one.)
    tideline_agent::transport::tls::client_config(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)?;
    let logging = tideline_service::log::init(&cfg.log, Vec::new()).context("log.gelf_address")?;
    let (gelf_handle, filter_handle) = (logging.gelf, logging.filter);

    std::fs::create_dir_all(&cfg.state.dir)
        .with_context(|| format!("cannot create state directory {}", cfg.state.dir.display()))?;
    // One agent per state directory: two would corrupt each other's maps.
    let _lock = tideline_agent::tracking::StateLock::acquire(&cfg.state.dir)?;

    // Configuration and state are loaded: systemd may consider us started,
    // whether or not the controller answers yet.
    let notifier = Arc::new(Notifier::from_env()?);
    let heartbeat = Heartbeat::new();
    notifier.send(&format!(
        "READY=1\n{}",
        status_assignment(&format!(
            "starting; connecting to {}",
            cfg.controller_addr()
        ))
    ))?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = rt.block_on(async {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        if let Some(every) = watchdog_interval() {
            // `every` is half of WatchdogSec. Pings stop once the work loop
            // has not made progress for a whole WatchdogSec; systemd then
            // restarts the agent when WatchdogSec has passed since the last.
            tokio::spawn(run_watchdog(
                notifier.clone(),
                heartbeat.clone_handle(),
                every,
                every * 2,
                rx.clone(),
            ));
        }
        let stopping = notifier.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("stopping at the next frame boundary");
            let _ = stopping.stopping();
            let _ = tx.send(true);
        });
        let settings = Arc::new(connection::RuntimeSettings::from_config(&cfg)?);
        let status_file = Arc::new(StatusFile::open(&cfg.state.dir));
        status_file.update(|d| {
            d.controller = cfg.controller_addr();
            d.disks
                .retain(|id, _| cfg.disks.iter().any(|c| &c.id == id));
            for c in &cfg.disks {
                d.disks.entry(c.id.clone()).or_default();
            }
        });
        let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
        let reload = Reload {
            path: config_path.to_owned(),
            running: cfg.clone(),
            settings: settings.clone(),
            filter: filter_handle,
            notifier: notifier.clone(),
        };
        tokio::spawn(async move {
            let mut reload = reload;
            while hup.recv().await.is_some() {
                reload.apply();
            }
        });
        connection::run(
            Arc::new(cfg),
            rx,
            connection::ServiceHooks {
                notifier,
                heartbeat,
                status_file,
            },
            settings,
        )
        .await
    });
    if let Some(h) = gelf_handle {
        h.flush(std::time::Duration::from_secs(2));
    }
    result
}

/// SIGHUP: re-reads the configuration and applies what can change while
/// the agent runs (log level, bandwidth limits, controller address); names
/// every other change, which needs a restart.
struct Reload {
    path: std::path::PathBuf,
    running: AgentConfig,
    settings: Arc<connection::RuntimeSettings>,
    filter: tracing_subscriber::reload::Handle<
        tracing_subscriber::EnvFilter,
        tracing_subscriber::Registry,
    >,
    notifier: Arc<Notifier>,
}

impl Reload {
    fn apply(&mut self) {
        let _ = self.notifier.send("RELOADING=1");
        let new = match AgentConfig::load(&self.path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "reload failed; the running configuration stays");
                let _ = self.notifier.send("READY=1");
                return;
            }
        };
        let mut applied = Vec::new();
        if new.log.level != self.running.log.level && std::env::var_os("RUST_LOG").is_none() {
            let level = new.log.level.as_deref().unwrap_or("info");
            match self
                .filter
                .reload(tracing_subscriber::EnvFilter::new(level))
            {
                Ok(()) => applied.push("log.level"),
                Err(e) => tracing::warn!(error = %e, "log level not changed"),
            }
        }
        if new.bandwidth != self.running.bandwidth {
            if let (Ok(schedule), Ok(mut current)) =
                (new.bandwidth.schedule(), self.settings.bandwidth.write())
            {
                *current = schedule;
                applied.push("bandwidth");
            }
        }
        let mut not_applied = Vec::new();
        if (new.controller_addr(), new.server_name())
            != (self.running.controller_addr(), self.running.server_name())
        {
            if let Ok(mut c) = self.settings.controller.write() {
                *c = (new.controller_addr(), new.server_name());
                applied.push("controller.address (from the next connection)");
            }
        }
        let timing = |c: &tideline_agent::config::ControllerSection| {
            (c.reconnect_min_ms, c.reconnect_max_ms, c.heartbeat_secs)
        };
        if timing(&new.controller) != timing(&self.running.controller) {
            not_applied.push("controller.reconnect_*/heartbeat_secs");
        }
        if new.tls != self.running.tls {
            not_applied.push("tls");
        }
        if new.state != self.running.state {
            not_applied.push("state");
        }
        if new.sync != self.running.sync {
            not_applied.push("sync");
        }
        if new.disks != self.running.disks {
            not_applied.push("disk");
        }
        if new.log.gelf_address != self.running.log.gelf_address
            || new.log.gelf_chunk_size != self.running.log.gelf_chunk_size
            || new.log.gelf_compression != self.running.log.gelf_compression
            || new.log.gelf_queue != self.running.log.gelf_queue
        {
            not_applied.push("log.gelf_*");
        }
        tracing::info!(applied = ?applied, "configuration reloaded");
        if !not_applied.is_empty() {
            tracing::warn!(not_applied = ?not_applied, "these changes need a restart of the agent");
        }
        // What was applied is now the running configuration; the rest stays
        // as it was until a restart.
        self.running.log.level = new.log.level.clone();
        self.running.bandwidth = new.bandwidth.clone();
        self.running.controller.address = new.controller.address.clone();
        self.running.controller.server_name = new.controller.server_name.clone();
        let _ = self.notifier.send("READY=1");
    }
}

fn show_status(cfg: &AgentConfig, json: bool) -> Result<()> {
    let path = cfg.state.dir.join(status_file::STATUS_FILE);
    let doc = status_file::read(&path)
        .with_context(|| format!("no status in {} (has the agent run yet?)", path.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    let now = status_file::unix_now();
    let running = std::path::Path::new(&format!("/proc/{}", doc.pid)).exists();
    let age = |t: u64| {
        let s = now.saturating_sub(t);
        if s < 120 {
            format!("{s}s")
        } else if s < 7200 {
            format!("{}m", s / 60)
        } else {
            format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
        }
    };
    println!(
        "agent {} (pid {}), {} {}, status from {} ago",
        if running { "running" } else { "not running" },
        doc.pid,
        if doc.connected {
            "connected to"
        } else {
            "not connected to"
        },
        doc.controller,
        age(doc.updated_unix)
    );
    if let Some(s) = doc.session {
        println!("session {s}");
    }
    if let Some(e) = &doc.last_error {
        println!("last error: {e}");
    }
    println!(
        "{:<16} {:>10} {:>10} {:>18} {:>26} last error",
        "disk", "point", "RPO lag", "consistency", "progress"
    );
    for (id, d) in &doc.disks {
        let progress = if d.scanning {
            format!(
                "{:.1}% {:.0} MiB/s ETA {}",
                d.percent.unwrap_or(0.0),
                d.mib_per_s.unwrap_or(0.0),
                d.eta_secs.map_or("?".into(), |e| format!("{e:.0}s"))
            )
        } else {
            "idle".into()
        };
        // The level of the last point copied, and how long it was frozen.
        let consistency = match (&d.last_consistency, d.last_frozen_ms) {
            (Some(l), Some(ms)) if ms > 0 => format!("{l} {ms}ms"),
            (Some(l), _) => l.clone(),
            _ => "-".into(),
        };
        println!(
            "{:<16} {:>10} {:>10} {:>18} {:>26} {}",
            id,
            d.last_point.map_or("-".into(), |p| p.to_string()),
            d.last_point_unix.map_or("-".into(), age),
            consistency,
            progress,
            d.last_error.as_deref().unwrap_or("-")
        );
        if let Some(note) = &d.last_note {
            println!("{:<16} note: {note}", "");
        }
    }
    Ok(())
}
