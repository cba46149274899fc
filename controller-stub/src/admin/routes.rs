//! The admin routes: what each request does to the controller.
//!
//! | method | path | does |
//! |---|---|---|
//! | GET  | `/v1/agents` | agents, their disks, latest points and RPO lag |
//! | POST | `/v1/agents/{agent}/sync` | start a sync (`{"disks": [..]}`, all disks when absent) |
//! | GET  | `/v1/sessions` | every session since start |
//! | GET  | `/v1/sessions/{id}` | one session's progress |
//! | GET  | `/v1/agents/{agent}/disks/{disk}/points` | committed points |
//! | POST | `/v1/agents/{agent}/disks/{disk}/points/{point}/export` | export as a sparse raw image (`{"path": ".."}`) |
//! | POST | `/v1/agents/{agent}/disks/{disk}/points/{point}/verify` | re-read and re-hash a point |
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
        ("GET", ["v1", "agents"]) => Response::ok(json!(ctl.agents_summary())),
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
                    match store.export_raw(&agent, &disk, point, &path, &mut |_, _| {}) {
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
