//! The admin routes: what each request does to the controller.
//!
//! | method | path | does |
//! |---|---|---|
//! | GET  | `/metrics` | Prometheus text exposition (see [`metrics`]) |
//! | GET  | `/v1/agents` | agents, their disks, latest points and RPO lag |
//! | POST | `/v1/agents/{agent}/sync` | start a sync (`{"disks": [..]}`, all disks when absent) |
//! | POST | `/v1/agents/{agent}/failback` | start a failback pass into the agent's targets (`{"targets": [{"target", "from_agent", "disk", "point"?, "force"?, "rescan"?}]}`) |
//! | GET  | `/v1/failback` | every failback pass since start |
//! | GET  | `/v1/failback/{id}` | one pass's progress: compared, sent, written, verified, MiB/s, ETA |
//! | POST | `/v1/plans/failback` | validate a DR plan (`{"plan": "<JSON text>", "check": bool, "rescan": bool}`); 422 with every problem, or start failing its devices back in rank order (`{"run": id}`) |
//! | GET  | `/v1/plans/{run}` | a plan run: each device's pass and state |
//! | GET  | `/v1/sessions` | every session since start |
//! | GET  | `/v1/sessions/{id}` | one session's progress |
//! | GET  | `/v1/agents/{agent}/disks/{disk}/points` | committed points |
//! | POST | `/v1/agents/{agent}/disks/{disk}/points/{point}/export` | export as a sparse raw image or a streamOptimized VMDK (`{"path": "..", "format": "raw" or "vmdk"}`, raw when absent) |
//! | POST | `/v1/agents/{agent}/disks/{disk}/points/{point}/verify` | re-read and re-hash a point |
//! | POST | `/v1/agents/{agent}/disks/{disk}/points/{point}/serve` | serve as a read-only NBD export (see [`super::exports`]) |
//! | GET, DELETE, POST | `/v1/exports[/{id}[/stop]]` | live NBD exports: list, stop (see [`super::exports`]) |
//! | GET, POST | `/v1/revocations[/remove]` | the revocation list: list, revoke, lift (see [`super::revocations`]) |
//!
//! `{point}` is a number or `latest`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use super::http::{Request, Response};
use crate::registry::Controller;
use crate::store::{PointId, StoreError};

/// Answers one admin request.
pub async fn handle(ctl: Arc<Controller>, req: Request) -> Response {
    let parts: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["metrics"]) => Response::text(metrics(&ctl)),
        ("GET", ["v1", "agents"]) => Response::ok(json!(ctl.agents_summary())),
        ("GET", ["v1", "store"]) => Response::ok(json!({
            "root": ctl.store.root(),
            "health": ctl.store.health(),
            "stats": ctl.store.stats(),
            "damage": ctl.store.damage(),
        })),
        ("POST", ["v1", "agents", agent, "sync"]) => {
            let disks: Vec<String> = match req.body.get("disks") {
                None | Some(Value::Null) => Vec::new(),
                Some(v) => match serde_json::from_value(v.clone()) {
                    Ok(d) => d,
                    Err(_) => return Response::error(400, "\"disks\" must be a list of disk ids"),
                },
            };
            match ctl.request_sync(agent, disks).await {
                Ok(session) => Response::ok(json!({ "session": session })),
                Err(e) => Response::error(409, e),
            }
        }
        ("POST", ["v1", "agents", agent, "failback"]) => {
            let request: crate::failback::FailbackRequest =
                match serde_json::from_value(req.body.clone()) {
                    Ok(r) => r,
                    Err(e) => return Response::error(400, format!("bad failback request: {e}")),
                };
            match ctl.request_failback(agent, request).await {
                Ok(session) => Response::ok(json!({ "session": session })),
                Err(e) => Response::error(409, e),
            }
        }
        ("GET", ["v1", "failback"]) => {
            let ids: Vec<u64> = ctl.registry().failbacks.keys().copied().collect();
            let list: Vec<_> = ids
                .into_iter()
                .filter_map(|id| ctl.failback_status(id))
                .collect();
            Response::ok(json!(list))
        }
        ("GET", ["v1", "failback", id]) => {
            match id
                .parse::<u64>()
                .ok()
                .and_then(|id| ctl.failback_status(id))
            {
                Some(s) => Response::ok(json!(s)),
                None => Response::error(404, format!("no failback pass {id}")),
            }
        }
        ("POST", ["v1", "plans", "failback"]) => {
            let Some(text) = req.body.get("plan").and_then(Value::as_str) else {
                return Response::error(400, "needs {\"plan\": \"<the DR plan as JSON text>\"}");
            };
            let check = req.body.get("check").and_then(Value::as_bool) == Some(true);
            let rescan = req.body.get("rescan").and_then(Value::as_bool) == Some(true);
            match crate::plan::validate(text, ctl.store.as_ref()) {
                Err(problems) => Response {
                    status: 422,
                    text: None,
                    body: json!({
                        "error": format!("the DR plan has {} problem(s); nothing was started", problems.problems().len()),
                        "problems": problems.to_string().lines().collect::<Vec<_>>(),
                    }),
                },
                Ok(plan) if check => Response::ok(json!({ "plan": plan })),
                Ok(plan) => {
                    let run = crate::failback::plan_run::start(ctl.clone(), plan, rescan);
                    let id = run.lock().map(|r| r.id).unwrap_or(0);
                    Response::ok(json!({ "run": id }))
                }
            }
        }
        ("GET", ["v1", "plans", id]) => {
            let run = id
                .parse::<u64>()
                .ok()
                .and_then(|id| ctl.registry().plan_runs.get(&id).cloned());
            match run.and_then(|r| r.lock().ok().map(|r| r.clone())) {
                Some(r) => Response::ok(json!(r)),
                None => Response::error(404, format!("no plan run {id}")),
            }
        }
        ("GET", ["v1", "sessions"]) => {
            let ids: Vec<u64> = ctl.registry().sessions.keys().copied().collect();
            let list: Vec<_> = ids
                .into_iter()
                .filter_map(|id| ctl.session_status(id))
                .collect();
            Response::ok(json!(list))
        }
        ("GET", ["v1", "sessions", id]) => {
            match id.parse::<u64>().ok().and_then(|id| ctl.session_status(id)) {
                Some(s) => Response::ok(json!(s)),
                None => Response::error(404, format!("no session {id}")),
            }
        }
        ("GET", ["v1", "agents", agent, "disks", disk, "points"]) => {
            match ctl.store.points(agent, disk) {
                Ok(points) => Response::ok(json!(points)),
                Err(e) => store_error(e),
            }
        }
        (
            "POST",
            ["v1", "agents", agent, "disks", disk, "points", point, action @ ("export" | "verify")],
        ) => {
            let point = match resolve_point(&ctl, agent, disk, point) {
                Ok(p) => p,
                Err(r) => return r,
            };
            let (agent, disk, action) = (agent.to_string(), disk.to_string(), action.to_string());
            let path = req
                .body
                .get("path")
                .and_then(Value::as_str)
                .map(PathBuf::from);
            let vmdk = match req.body.get("format") {
                _ if action != "export" => false,
                None | Some(Value::Null) => false,
                Some(f) if f == "raw" => false,
                Some(f) if f == "vmdk" => true,
                Some(_) => return Response::error(400, "\"format\" must be \"raw\" or \"vmdk\""),
            };
            let store = ctl.store.clone();
            let job = tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                if action == "export" {
                    let Some(path) = path else {
                        return Response::error(
                            400,
                            "export needs {\"path\": \"/where/to/write.raw\"}",
                        );
                    };
                    if path.is_relative() {
                        return Response::error(400, "export path must be absolute");
                    }
                    let exported = if vmdk {
                        store.export_vmdk(&agent, &disk, point, &path, &mut |_, _| {})
                    } else {
                        store.export_raw(&agent, &disk, point, &path, &mut |_, _| {})
                    };
                    match exported {
                        Ok(r) => Response::ok(json!({
                            "point": point,
                            "path": path,
                            "report": r,
                            "seconds": started.elapsed().as_secs_f64(),
                        })),
                        Err(e) => store_error(e),
                    }
                } else {
                    match store.verify_point(&agent, &disk, point) {
                        Ok(r) => {
                            let ok = r.ok();
                            Response::ok(json!({
                                "ok": ok,
                                "report": r,
                                "seconds": started.elapsed().as_secs_f64(),
                            }))
                        }
                        Err(e) => store_error(e),
                    }
                }
            });
            job.await
                .unwrap_or_else(|e| Response::error(500, format!("admin task failed: {e}")))
        }
        ("POST", ["v1", "agents", agent, "disks", disk, "points", point, "serve"]) => {
            match resolve_point(&ctl, agent, disk, point) {
                Ok(p) => super::exports::serve(ctl.clone(), agent, disk, p, &req.body).await,
                Err(r) => r,
            }
        }
        (_, ["v1", "exports", ..]) => super::exports::handle(&ctl, &req),
        (_, ["v1", "revocations", ..]) => super::revocations::handle(ctl, req.clone()).await,
        _ => Response::error(404, format!("no route for {} {}", req.method, req.path)),
    }
}

fn resolve_point(
    ctl: &Controller,
    agent: &str,
    disk: &str,
    point: &str,
) -> Result<PointId, Response> {
    if point == "latest" {
        match ctl.store.latest_point(agent, disk) {
            Ok(Some(p)) => Ok(p.point),
            Ok(None) => Err(Response::error(
                404,
                format!("agent {agent} disk {disk} has no point yet"),
            )),
            Err(e) => Err(store_error(e)),
        }
    } else {
        point
            .parse()
            .map_err(|_| Response::error(400, format!("{point:?} is not a point id or \"latest\"")))
    }
}

fn store_error(e: StoreError) -> Response {
    let status = match e {
        StoreError::NotFound { .. } => 404,
        StoreError::InvalidId(_) => 400,
        _ => 500,
    };
    Response::error(status, e.to_string())
}

/// The controller's state in the Prometheus text format: per agent whether
/// it is connected; per disk the latest point and its age (the RPO lag to
/// alert on); sessions by state with the bytes they moved; the store's size.
pub fn metrics(ctl: &Controller) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let agents = ctl.agents_summary();
    let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    metric(
        "tideline_agent_connected",
        "gauge",
        "1 when the agent's control channel is up.",
        agents
            .iter()
            .map(|a| {
                (
                    format!("{{agent=\"{}\"}}", a.id),
                    u8::from(a.connected).to_string(),
                )
            })
            .collect(),
    );
    let disks: Vec<_> = agents
        .iter()
        .flat_map(|a| a.disks.iter().map(move |d| (a.id.clone(), d)))
        .collect();
    metric(
        "tideline_disk_latest_point",
        "gauge",
        "Id of the disk's latest committed recovery point.",
        disks
            .iter()
            .filter_map(|(a, d)| {
                d.latest_point.map(|p| {
                    (
                        format!("{{agent=\"{a}\",disk=\"{}\"}}", d.id),
                        p.to_string(),
                    )
                })
            })
            .collect(),
    );
    metric(
        "tideline_disk_latest_point_consistency",
        "gauge",
        "Consistency of the disk's latest point: 0 none, 1 crash (hypervisor), 2 crash (snapshot), 3 crash (frozen), 4 application.",
        disks
            .iter()
            .filter_map(|(a, d)| {
                d.latest_consistency.as_ref().map(|c| {
                    (
                        format!(
                            "{{agent=\"{a}\",disk=\"{}\",level=\"{}\"}}",
                            d.id,
                            c.level.as_str()
                        ),
                        c.level.code().to_string(),
                    )
                })
            })
            .collect(),
    );
    metric(
        "tideline_disk_latest_point_frozen_milliseconds",
        "gauge",
        "How long the filesystems were frozen for the disk's latest point (0: not frozen).",
        disks
            .iter()
            .filter_map(|(a, d)| {
                d.latest_consistency.as_ref().map(|c| {
                    (
                        format!("{{agent=\"{a}\",disk=\"{}\"}}", d.id),
                        c.frozen_ms.to_string(),
                    )
                })
            })
            .collect(),
    );
    metric(
        "tideline_disk_rpo_lag_seconds",
        "gauge",
        "Age of the disk's latest committed recovery point.",
        disks
            .iter()
            .filter_map(|(a, d)| {
                d.rpo_lag_secs.map(|s| {
                    (
                        format!("{{agent=\"{a}\",disk=\"{}\"}}", d.id),
                        s.to_string(),
                    )
                })
            })
            .collect(),
    );
    let sessions: Vec<_> = {
        let ids: Vec<u64> = ctl.registry().sessions.keys().copied().collect();
        ids.into_iter()
            .filter_map(|id| ctl.session_status(id))
            .collect()
    };
    let mut by_state = std::collections::BTreeMap::new();
    for s in &sessions {
        let state = serde_json::to_value(&s.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        *by_state.entry(state).or_insert(0u64) += 1;
    }
    metric(
        "tideline_sessions",
        "gauge",
        "Sessions since the controller started, by state.",
        by_state
            .into_iter()
            .map(|(state, n)| (format!("{{state=\"{state}\"}}"), n.to_string()))
            .collect(),
    );
    metric(
        "tideline_session_wire_bytes_total",
        "counter",
        "Bytes received from agents in sessions since the controller started.",
        vec![(
            String::new(),
            sessions
                .iter()
                .map(|s| s.wire_bytes)
                .sum::<u64>()
                .to_string(),
        )],
    );
    let stats = ctl.store.stats();
    metric(
        "tideline_store_chunks",
        "gauge",
        "Distinct chunks in the store.",
        vec![(String::new(), stats.chunks.to_string())],
    );
    metric(
        "tideline_store_bytes",
        "gauge",
        "Bytes of chunk records in the store's packs.",
        vec![(String::new(), stats.stored_bytes.to_string())],
    );
    let health = ctl.store.health();
    metric(
        "tideline_store_writable",
        "gauge",
        "1 while the store takes new points; 0 when it refuses them (full: see `tideline-controller store`).",
        vec![(String::new(), u8::from(health.writable).to_string())],
    );
    if let Some(free) = health.free_bytes {
        metric(
            "tideline_store_free_bytes",
            "gauge",
            "Bytes free on the store's file system.",
            vec![(String::new(), free.to_string())],
        );
    }
    metric(
        "tideline_store_damaged_records",
        "gauge",
        "Damaged chunk records found in the middle of packs when the store was opened.",
        vec![(String::new(), health.damaged_records.to_string())],
    );
    out
}
