//! Admin routes of the revocation list (`tideline-controller revoke`,
//! `unrevoke`, `revoked`):
//!
//! | method | path | does |
//! |---|---|---|
//! | GET  | `/v1/revocations` | the list in force and its file |
//! | POST | `/v1/revocations` | revoke (`{"agent", "reason"?, "serial"?, "sha256"?}`): writes the file, closes the agent's live connection |
//! | POST | `/v1/revocations/remove` | lift (`{"agent", "serial"?, "sha256"?}`): writes the file; 404 when nothing matched |
//!
//! The file is rewritten on a blocking thread (it is fsynced); the list is
//! in force, and the connections it refuses are closed, before the answer.

use std::sync::Arc;

use serde_json::{json, Value};

use super::http::{Request, Response};
use crate::registry::Controller;
use crate::revocation::{rfc3339, RevocationError, RevocationTarget};

/// Answers a request under `/v1/revocations`.
pub async fn handle(ctl: Arc<Controller>, req: Request) -> Response {
    let parts: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    // Called for paths under /v1/revocations, whose first two parts are
    // those; anything shorter matches no route.
    match (req.method.as_str(), parts.get(2..).unwrap_or(&["?"])) {
        ("GET", []) => {
            let list = ctl.revocations.current();
            Response::ok(json!({
                "file": ctl.revocations.path(),
                "agents": list.agents,
                "certificates": list.certificates,
            }))
        }
        ("POST", []) => {
            let body = req.body.clone();
            blocking(move || revoke(&ctl, &body)).await
        }
        ("POST", ["remove"]) => {
            let body = req.body.clone();
            blocking(move || unrevoke(&ctl, &body)).await
        }
        _ => Response::error(404, format!("no route for {} {}", req.method, req.path)),
    }
}

async fn blocking(job: impl FnOnce() -> Response + Send + 'static) -> Response {
    tokio::task::spawn_blocking(job)
        .await
        .unwrap_or_else(|e| Response::error(500, format!("admin task failed: {e}")))
}

fn revoke(ctl: &Controller, body: &Value) -> Response {
    let target = match target(body) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let reason = body.get("reason").and_then(Value::as_str).unwrap_or("");
    let now = rfc3339(std::time::SystemTime::now());
    let (entry, changed) = match ctl
        .revocations
        .edit(|list| list.revoke(&target, reason, &now))
    {
        Ok(r) => r,
        Err(e) => return revocation_error(e),
    };
    let closed: Vec<String> = ctl
        .enforce_revocations()
        .into_iter()
        .map(|r| r.to_string())
        .collect();
    if changed {
        tracing::warn!(target = %target, entry = %entry, reason = entry.reason(), "revoked");
    }
    Response::ok(json!({
        "message": if changed {
            format!("{target} revoked: {entry}")
        } else {
            format!("{target} was already revoked: {entry}")
        },
        "changed": changed,
        "entry": entry,
        "closed": closed,
    }))
}

fn unrevoke(ctl: &Controller, body: &Value) -> Response {
    let target = match target(body) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let removed = match ctl.revocations.edit(|list| {
        let removed = list.unrevoke(&target);
        if removed.is_empty() {
            return Err(RevocationError::NotRevoked(format!(
                "{target} is not revoked in {}",
                ctl.revocations.path().display()
            )));
        }
        Ok(removed)
    }) {
        Ok(r) => r,
        Err(e) => return revocation_error(e),
    };
    tracing::info!(target = %target, entries = removed.len(), "revocation lifted");
    Response::ok(json!({
        "message": format!("{target} is no longer revoked"),
        "removed": removed,
    }))
}

/// The agent id and optional certificate a request names.
fn target(body: &Value) -> Result<RevocationTarget, Response> {
    let field = |k: &str| body.get(k).and_then(Value::as_str);
    let Some(agent) = field("agent") else {
        return Err(Response::error(400, "needs {\"agent\": \"<agent id>\"}"));
    };
    RevocationTarget::new(agent, field("serial"), field("sha256")).map_err(revocation_error)
}

fn revocation_error(e: RevocationError) -> Response {
    let status = match e {
        RevocationError::Request(_) => 400,
        RevocationError::NotRevoked(_) => 404,
        // The file on disk does not load: fix it by hand, then retry.
        RevocationError::Parse { .. }
        | RevocationError::Value { .. }
        | RevocationError::TooLarge { .. } => 409,
        RevocationError::Read { .. } | RevocationError::Write { .. } => 500,
    };
    Response::error(status, e.to_string())
}
