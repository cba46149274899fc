//! `tideline-controller`: the reference controller daemon, its certificate
//! tools, and the admin CLI that talks to a running controller.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use tideline_controller::admin::{http, routes};
use tideline_controller::config::{ControllerConfig, DEFAULT_ADMIN_SOCKET, DEFAULT_CONFIG_PATH};
use tideline_controller::registry::Controller;
use tideline_controller::revocation::Revocations;
use tideline_controller::service::ServiceReport;
use tideline_controller::store::Store;
use tideline_controller::{link, pki, scheduler, tls};
use tideline_service::{watchdog_interval, Notifier};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "tideline-controller",
    version,
    about = "Tideline reference controller"
)]
struct Cli {
    /// Configuration file (for `serve`, and to find the admin socket).
    #[arg(long, short, global = true, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Admin socket of the running controller (default: from the
    /// configuration, else /run/tideline/controller.sock).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller.
    Serve,
    /// Validate the configuration and exit.
    CheckConfig,
    /// Certificate authority and certificates for mutual TLS.
    #[command(subcommand)]
    Ca(CaCommand),
    /// List agents, their disks, latest points and RPO lag.
    Agents,
    /// Show whether the store takes new points (and why not), its free
    /// space, its size and any damage found in its packs.
    Store,
    /// Start a sync of an agent's disks and (by default) wait for it.
    Sync {
        /// Agent id.
        #[arg(long)]
        agent: String,
        /// Disk id (repeat for several; default: all the agent's disks).
        #[arg(long = "disk")]
        disks: Vec<String>,
        /// Return at once with the session id.
        #[arg(long)]
        no_wait: bool,
    },
    /// Write recovery points into a failback agent's targets (one pass) and
    /// (by default) wait for it, printing progress.
    Failback {
        /// The failback agent (the one that writes).
        #[arg(long)]
        agent: String,
        /// TARGET=FROM_AGENT/DISK[@POINT]: write that point (latest when
        /// no @POINT) into the agent's target TARGET. Repeat for several.
        #[arg(long = "target", required = true)]
        targets: Vec<String>,
        /// Write even into targets that look mounted or in use.
        #[arg(long)]
        force: bool,
        /// Read the targets to describe them, even if the agent's map of
        /// the last pass could.
        #[arg(long)]
        rescan: bool,
        /// Return at once with the session id.
        #[arg(long)]
        no_wait: bool,
    },
    /// Fail back every device of a DR plan, in rank order (one pass each),
    /// after checking the whole plan; waits and prints progress.
    FailbackPlan {
        /// The DR plan (JSON, see docs/dr-plan.md).
        #[arg(long)]
        plan: PathBuf,
        /// Only validate the plan and print it resolved.
        #[arg(long)]
        check: bool,
        /// Read every target to describe it.
        #[arg(long)]
        rescan: bool,
    },
    /// Show failback passes (all, or one).
    Passes {
        /// Session id.
        id: Option<u64>,
    },
    /// Show sessions (all, or one).
    Sessions {
        /// Session id.
        id: Option<u64>,
    },
    /// List the recovery points of a disk.
    Points {
        /// Agent id.
        #[arg(long)]
        agent: String,
        /// Disk id.
        #[arg(long)]
        disk: String,
    },
    /// Export a point as a sparse raw image or a streamOptimized VMDK.
    Export {
        #[command(flatten)]
        at: PointRef,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Image format: "raw" (sparse raw image) or "vmdk" (streamOptimized,
        /// for import into VMware).
        #[arg(long, default_value = "raw", value_parser = ["raw", "vmdk"])]
        format: String,
    },
    /// Revoke an agent: its live connection is closed and new ones are
    /// refused until `unrevoke`. With --serial or --sha256, only that
    /// certificate of the agent.
    Revoke {
        /// Agent id (the CN of its certificate).
        agent: String,
        /// Why (shown in every refusal, in the log and to the agent).
        #[arg(long, default_value = "")]
        reason: String,
        /// Only the certificate with this serial number (hex).
        #[arg(long)]
        serial: Option<String>,
        /// Only the certificate with this SHA-256 fingerprint (hex).
        #[arg(long)]
        sha256: Option<String>,
    },
    /// Lift the revocation of an agent (or, with --serial or --sha256, of
    /// one of its certificates).
    Unrevoke {
        /// Agent id.
        agent: String,
        /// The certificate entry with this serial number (hex).
        #[arg(long)]
        serial: Option<String>,
        /// The certificate entry with this SHA-256 fingerprint (hex).
        #[arg(long)]
        sha256: Option<String>,
    },
    /// List the revoked agents and certificates in force.
    Revoked,
    /// Serve a point as a read-only NBD export on a Unix socket, until
    /// `unserve` or its TTL ends (`serve` runs the daemon, hence the name).
    /// Prints the socket and an `nbd+unix://` URI for nbdinfo, nbdcopy,
    /// qemu-img.
    ServePoint {
        #[command(flatten)]
        at: PointRef,
        /// Seconds until the export closes (default: `[serve] ttl_secs`,
        /// else 3600).
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// List the live NBD exports.
    Exports,
    /// Stop an NBD export: its socket goes away and its clients are
    /// disconnected.
    Unserve {
        /// Export id (from `serve-point` or `exports`).
        id: u64,
    },
    /// Re-read and re-hash everything a point references.
    Verify {
        #[command(flatten)]
        at: PointRef,
    },
}

/// The point a client command acts on.
#[derive(clap::Args)]
struct PointRef {
    /// Agent id.
    #[arg(long)]
    agent: String,
    /// Disk id.
    #[arg(long)]
    disk: String,
    /// Point id or "latest".
    #[arg(long, default_value = "latest")]
    point: String,
}

impl PointRef {
    /// The admin route of `action` on this point.
    fn route(&self, action: &str) -> String {
        format!(
            "/v1/agents/{}/disks/{}/points/{}/{action}",
            self.agent, self.disk, self.point
        )
    }
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a CA in a directory (ca.crt, ca.key).
    Init {
        /// Directory for the CA.
        #[arg(long)]
        dir: PathBuf,
        /// Common name of the CA.
        #[arg(long, default_value = "Tideline CA")]
        name: String,
    },
    /// Issue the controller's server certificate.
    IssueController {
        /// CA directory.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// File name stem and common name.
        #[arg(long, default_value = "controller")]
        name: String,
        /// DNS names or IP addresses the agents dial (repeat).
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
    },
    /// Issue an agent's client certificate (its CN is the agent id).
    IssueAgent {
        /// CA directory.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Agent id.
        #[arg(long)]
        id: String,
    },
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("tideline-controller: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let socket = || -> PathBuf {
        cli.socket.clone().unwrap_or_else(|| {
            ControllerConfig::load(&cli.config)
                .map(|c| c.admin.socket)
                .unwrap_or_else(|_| PathBuf::from(DEFAULT_ADMIN_SOCKET))
        })
    };
    match &cli.command {
        Command::Serve => serve(ControllerConfig::load(&cli.config)?),
        Command::CheckConfig => {
            let c = ControllerConfig::load(&cli.config)?;
            let revocations = Arc::new(Revocations::load(&c.revocation_file())?);
            tls::server_config(&c.tls.ca, &c.tls.cert, &c.tls.key, revocations)?;
            println!("{}: ok", cli.config.display());
            Ok(())
        }
        Command::Ca(c) => ca(c),
        Command::Agents => print(admin(&socket(), "GET", "/v1/agents", None)?),
        Command::Store => print(admin(&socket(), "GET", "/v1/store", None)?),
        Command::Sessions { id } => {
            let path = match id {
                Some(id) => format!("/v1/sessions/{id}"),
                None => "/v1/sessions".into(),
            };
            print(admin(&socket(), "GET", &path, None)?)
        }
        Command::Sync {
            agent,
            disks,
            no_wait,
        } => {
            let body = if disks.is_empty() {
                json!({})
            } else {
                json!({ "disks": disks })
            };
            let r = admin(
                &socket(),
                "POST",
                &format!("/v1/agents/{agent}/sync"),
                Some(&body),
            )?;
            let session = r["session"]
                .as_u64()
                .context("controller returned no session id")?;
            if *no_wait {
                return print(r);
            }
            wait_for_session(&socket(), session)
        }
        Command::Failback {
            agent,
            targets,
            force,
            rescan,
            no_wait,
        } => {
            let mut list = Vec::new();
            for t in targets {
                list.push(parse_target(t, *force, *rescan)?);
            }
            let r = admin(
                &socket(),
                "POST",
                &format!("/v1/agents/{agent}/failback"),
                Some(&json!({ "targets": list })),
            )?;
            let session = r["session"]
                .as_u64()
                .context("controller returned no session id")?;
            if *no_wait {
                return print(r);
            }
            wait_for_failback(&socket(), session)
        }
        Command::FailbackPlan {
            plan,
            check,
            rescan,
        } => {
            let text = std::fs::read_to_string(plan)
                .with_context(|| format!("cannot read DR plan {}", plan.display()))?;
            let body = json!({ "plan": text, "check": check, "rescan": rescan });
            let (status, v) = http::request(&socket(), "POST", "/v1/plans/failback", Some(&body))?;
            if status == 422 {
                for p in v["problems"].as_array().into_iter().flatten() {
                    eprintln!("{}: {}", plan.display(), p.as_str().unwrap_or("?"));
                }
                bail!(
                    "{}",
                    v["error"].as_str().unwrap_or("the DR plan is invalid")
                );
            }
            if status != 200 {
                bail!("{}", v["error"].as_str().unwrap_or("request failed"));
            }
            if *check {
                return print(v);
            }
            let run = v["run"].as_u64().context("controller returned no run id")?;
            wait_for_plan(&socket(), run)
        }
        Command::Passes { id } => {
            let path = match id {
                Some(id) => format!("/v1/failback/{id}"),
                None => "/v1/failback".into(),
            };
            print(admin(&socket(), "GET", &path, None)?)
        }
        Command::Points { agent, disk } => print(admin(
            &socket(),
            "GET",
            &format!("/v1/agents/{agent}/disks/{disk}/points"),
            None,
        )?),
        Command::Export { at, out, format } => {
            let out = std::path::absolute(out)
                .with_context(|| format!("bad output path {}", out.display()))?;
            let r = admin(
                &socket(),
                "POST",
                &at.route("export"),
                Some(&json!({ "path": out, "format": format })),
            )?;
            print(r)
        }
        Command::Revoke {
            agent,
            reason,
            serial,
            sha256,
        } => print(admin(
            &socket(),
            "POST",
            "/v1/revocations",
            Some(&json!({ "agent": agent, "reason": reason, "serial": serial, "sha256": sha256 })),
        )?),
        Command::Unrevoke {
            agent,
            serial,
            sha256,
        } => print(admin(
            &socket(),
            "POST",
            "/v1/revocations/remove",
            Some(&json!({ "agent": agent, "serial": serial, "sha256": sha256 })),
        )?),
        Command::ServePoint { at, ttl } => print(admin(
            &socket(),
            "POST",
            &at.route("serve"),
            Some(&json!({ "ttl_secs": ttl })),
        )?),
        Command::Exports => print(admin(&socket(), "GET", "/v1/exports", None)?),
        Command::Unserve { id } => print(admin(
            &socket(),
            "DELETE",
            &format!("/v1/exports/{id}"),
            None,
        )?),
        Command::Revoked => print(admin(&socket(), "GET", "/v1/revocations", None)?),
        Command::Verify { at } => {
            let r = admin(&socket(), "POST", &at.route("verify"), None)?;
            let ok = r["ok"].as_bool().unwrap_or(false);
            print(r)?;
            if !ok {
                bail!(
                    "point {} of {}/{} failed verification",
                    at.point,
                    at.agent,
                    at.disk
                );
            }
            Ok(())
        }
    }
}

fn print(v: Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

fn admin(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let (status, v) = http::request(socket, method, path, body)?;
    if status != 200 {
        bail!(
            "{}",
            v["error"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("HTTP {status}"))
        );
    }
    Ok(v)
}

/// `TARGET=FROM_AGENT/DISK[@POINT]` as a failback request entry.
fn parse_target(spec: &str, force: bool, rescan: bool) -> Result<Value> {
    let bad = || anyhow::anyhow!("--target {spec:?}: expected TARGET=FROM_AGENT/DISK[@POINT]");
    let (target, source) = spec.split_once('=').ok_or_else(bad)?;
    let (source, point) = match source.split_once('@') {
        Some((s, p)) => (s, Some(p.parse::<u64>().map_err(|_| bad())?)),
        None => (source, None),
    };
    let (from_agent, disk) = source.split_once('/').ok_or_else(bad)?;
    if target.is_empty() || from_agent.is_empty() || disk.is_empty() {
        return Err(bad());
    }
    Ok(json!({
        "target": target,
        "from_agent": from_agent,
        "disk": disk,
        "point": point,
        "force": force,
        "rescan": rescan,
    }))
}

/// One line of progress for a failback pass.
fn failback_line(s: &Value) -> String {
    let mut parts = Vec::new();
    for t in s["targets"].as_array().into_iter().flatten() {
        let n = |k: &str| t[k].as_u64().unwrap_or(0);
        parts.push(format!(
            "{} <- {}/{}@{}: compared {}/{}, differing {}, sent {} ({:.1} MiB), written {}, verified {}{}",
            t["target"].as_str().unwrap_or("?"),
            t["source_agent"].as_str().unwrap_or("?"),
            t["disk"].as_str().unwrap_or("?"),
            n("point"),
            n("compared_blocks"),
            n("block_count"),
            n("differing_blocks"),
            n("sent_blocks"),
            n("sent_bytes") as f64 / 1048576.0,
            n("written_blocks"),
            n("verified_blocks"),
            if t["verified"].as_bool() == Some(true) { " ✓" } else { "" },
        ));
    }
    let rate = s["mib_per_s"]
        .as_f64()
        .map(|r| format!(", {r:.1} MiB/s"))
        .unwrap_or_default();
    let eta = s["eta_secs"]
        .as_f64()
        .map(|e| format!(", ETA {e:.0}s"))
        .unwrap_or_default();
    format!(
        "pass {} (session {}) {}: {}{rate}{eta}",
        s["pass"],
        s["session"],
        s["state"].as_str().unwrap_or("?"),
        parts.join("; ")
    )
}

/// Polls `path` on the admin socket until its `state` is `done` (prints
/// the final document) or `failed` (prints it and fails with its `error`),
/// printing `line(doc)` to stderr whenever it changes.
fn wait_until_finished(
    socket: &Path,
    path: &str,
    what: &str,
    mut line: impl FnMut(&Value) -> String,
) -> Result<()> {
    let mut last_line = String::new();
    loop {
        let doc = admin(socket, "GET", path, None)?;
        let now = line(&doc);
        if now != last_line {
            eprintln!("{now}");
            last_line = now;
        }
        match doc["state"].as_str() {
            Some("done") => return print(doc),
            Some("failed") => {
                let error = doc["error"].as_str().unwrap_or("unknown error").to_owned();
                print(doc)?;
                bail!("{what} failed: {error}");
            }
            _ => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

fn wait_for_plan(socket: &Path, run: u64) -> Result<()> {
    wait_until_finished(
        socket,
        &format!("/v1/plans/{run}"),
        &format!("plan run {run}"),
        |r| {
            let parts: Vec<String> = r["devices"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|d| {
                    format!(
                        "{} (rank {}, {}) {}",
                        d["name"].as_str().unwrap_or("?"),
                        d["rank"],
                        d["agent"].as_str().unwrap_or("?"),
                        d["state"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            format!(
                "plan run {run} {}: {}",
                r["state"].as_str().unwrap_or("?"),
                parts.join(", ")
            )
        },
    )
}

fn wait_for_failback(socket: &Path, session: u64) -> Result<()> {
    wait_until_finished(
        socket,
        &format!("/v1/failback/{session}"),
        &format!("failback pass {session}"),
        failback_line,
    )
}

fn wait_for_session(socket: &Path, session: u64) -> Result<()> {
    let started = Instant::now();
    wait_until_finished(
        socket,
        &format!("/v1/sessions/{session}"),
        &format!("session {session}"),
        |s| {
            let mut parts = Vec::new();
            for d in s["disks"].as_array().into_iter().flatten() {
                let total = d["block_count"].as_u64().unwrap_or(0);
                let at = d["scanned"]["block"].as_u64().unwrap_or(0);
                let round = d["scanned"]["round"].as_u64().unwrap_or(0);
                let pct = if total > 0 {
                    at as f64 * 100.0 / total as f64
                } else {
                    0.0
                };
                // Rounds after the first copy again what changed meanwhile.
                let round = if round > 0 && d["committed"].is_null() {
                    format!(" round {round}")
                } else {
                    String::new()
                };
                parts.push(format!(
                    "{}{round} {:.0}% ({} blocks sent)",
                    d["disk"].as_str().unwrap_or("?"),
                    if d["committed"].is_null() { pct } else { 100.0 },
                    d["blocks_received"].as_u64().unwrap_or(0)
                ));
            }
            let mib = s["wire_bytes"].as_u64().unwrap_or(0) as f64 / 1048576.0;
            let secs = started.elapsed().as_secs_f64().max(0.001);
            format!(
                "session {session} {}: {} | {mib:.1} MiB on the wire, {:.1} MiB/s",
                s["state"].as_str().unwrap_or("?"),
                parts.join(", "),
                mib / secs
            )
        },
    )
}

fn ca(c: &CaCommand) -> Result<()> {
    let issued = match c {
        CaCommand::Init { dir, name } => pki::init_ca(dir, name)?,
        CaCommand::IssueController {
            ca_dir,
            out,
            name,
            sans,
        } => pki::issue_controller(ca_dir, out, name, sans)?,
        CaCommand::IssueAgent { ca_dir, out, id } => pki::issue_agent(ca_dir, out, id)?,
    };
    print(json!({ "cert": issued.cert, "key": issued.key, "ca": issued.ca }))
}

fn serve(cfg: ControllerConfig) -> Result<()> {
    let logging =
        tideline_service::log::init(&cfg.log, vec![("component".into(), "controller".into())])
            .context("log.gelf_address")?;
    let notifier = Arc::new(Notifier::from_env()?);
    let watchdog = watchdog_interval();
    let mut report = ServiceReport::new(notifier, watchdog.is_some());
    // A list that does not load stops the controller: starting without it
    // would let revoked agents back in.
    let revocations = Arc::new(Revocations::load(&cfg.revocation_file())?);
    let tls = tls::server_config(
        &cfg.tls.ca,
        &cfg.tls.cert,
        &cfg.tls.key,
        revocations.clone(),
    )?;
    let store = Store::open(&cfg.store.dir)
        .with_context(|| format!("opening store {}", cfg.store.dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        // Before anything can observe the controller as started: SIGHUP's
        // default action would end it.
        let mut hup = signal(SignalKind::hangup())?;
        let listen = cfg.listen.address.clone();
        let socket = cfg.admin.socket.clone();
        let admin_socket = socket.clone();
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        tracing::info!(address = %listener.local_addr()?, "accepting agents");
        let ctl = Controller::new(cfg, store, revocations);
        ctl.exports
            .prepare_dir()
            .with_context(|| format!("preparing NBD export directory {}", ctl.exports.dir().display()))?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(link::serve_agents(ctl.clone(), listener, tls, stop_rx.clone()));
        tokio::spawn(scheduler::run(ctl.clone(), stop_rx.clone()));
        let mut admin_stop = stop_rx.clone();
        let admin_ctl = ctl.clone();
        let admin = tokio::spawn(async move {
            http::serve(
                &socket,
                move |req| routes::handle(admin_ctl.clone(), req),
                async move {
                    let _ = admin_stop.changed().await;
                },
            )
            .await
        });
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        // The store is open, agents can connect and the admin socket is
        // bound (http::serve binds before its first await): started.
        wait_for_socket(&admin_socket).await;
        report.ready(&ctl)?;
        tracing::info!(socket = %admin_socket.display(), "ready");
        let mut ticks = tokio::time::interval(ServiceReport::period(watchdog));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut admin = admin;
        let mut ping_failing = false;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => reload_revocations(&ctl),
                _ = ticks.tick() => {
                    // The main loop itself pings: if it is stuck, so are
                    // the pings, and systemd restarts the controller.
                    match report.tick(&ctl) {
                        Ok(()) => ping_failing = false,
                        Err(e) if !ping_failing => {
                            ping_failing = true;
                            tracing::warn!(error = %e, "cannot notify systemd");
                        }
                        Err(_) => {}
                    }
                }
                r = &mut admin => {
                    match r {
                        Ok(Err(e)) => return Err(anyhow::Error::from(e).context("admin interface failed")),
                        Err(e) => bail!("admin interface task failed: {e}"),
                        Ok(Ok(())) => break,
                    }
                }
            }
        }
        let _ = report.stopping();
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        ctl.exports.stop_all();
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Some(gelf) = &logging.gelf {
            gelf.flush(Duration::from_secs(2));
        }
        Ok(())
    })
}

/// SIGHUP: reads the revocation list again and closes the connections it
/// now refuses. A list that does not load is reported and the one in force
/// stays.
fn reload_revocations(ctl: &Controller) {
    let file = ctl.revocations.path().display().to_string();
    match ctl.revocations.reload() {
        Ok(list) => {
            tracing::info!(
                file,
                agents = list.agents.len(),
                certificates = list.certificates.len(),
                "revocation list reloaded"
            );
            ctl.enforce_revocations();
        }
        Err(e) => {
            tracing::error!(error = %e, "revocation list not reloaded; the previous list stays in force")
        }
    }
}

/// Waits (at most 5 s) until the admin socket accepts connections: the
/// admin task removes a stale socket and binds a new one right after it
/// starts, and READY=1 must not come before that. A failed bind ends the
/// admin task, which the main loop reports.
async fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::UnixStream::connect(path).await.is_err() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
