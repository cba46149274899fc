//! Admin routes of NBD exports (`tideline-controller serve-point`,
//! `exports`, `unserve`):
//!
//! | method | path | does |
//! |---|---|---|
//! | POST | `/v1/agents/{agent}/disks/{disk}/points/{point}/serve` | serve the point read-only over NBD (`{"ttl_secs"?}`, `[serve] ttl_secs` when absent): `{id, socket, uri, expires_unix, ..}` |
//! | GET  | `/v1/exports` | the live exports |
//! | DELETE, or POST `.../stop` | `/v1/exports/{id}` | stop an export: its socket is removed and its connections closed |

use std::sync::Arc;

use serde_json::{json, Value};

use super::http::{Request, Response};
use crate::registry::Controller;
use crate::serve::ServeError;
use crate::store::{PointId, StoreError};

/// `POST .../points/{point}/serve`, the point already resolved.
pub async fn serve(
    ctl: Arc<Controller>,
    agent: &str,
    disk: &str,
    point: PointId,
    body: &Value,
) -> Response {
    let ttl = match body.get("ttl_secs") {
        None | Some(Value::Null) => ctl.cfg.serve_ttl_secs(),
        Some(v) => match v.as_u64() {
            Some(t) => t,
            None => return Response::error(400, "\"ttl_secs\" must be a whole number"),
        },
    };
    match ctl
        .exports
        .start(ctl.store.clone(), agent, disk, point, ttl)
        .await
    {
        Ok(info) => Response::ok(json!(info)),
        Err(e @ ServeError::BadTtl(_)) => Response::error(400, e.to_string()),
        Err(ServeError::Store(e @ StoreError::NotFound { .. })) => {
            Response::error(404, e.to_string())
        }
        Err(ServeError::Store(e @ StoreError::InvalidId(_))) => Response::error(400, e.to_string()),
        Err(e) => Response::error(500, e.to_string()),
    }
}

/// A request under `/v1/exports`.
pub fn handle(ctl: &Controller, req: &Request) -> Response {
    let parts: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    match (req.method.as_str(), parts.get(2..).unwrap_or(&["?"])) {
        ("GET", []) => Response::ok(json!(ctl.exports.list())),
        ("DELETE", [id]) | ("POST", [id, "stop"]) => match id.parse::<u64>() {
            Ok(n) if ctl.exports.stop(n) => Response::ok(json!({ "stopped": n })),
            _ => Response::error(404, format!("no export {id}")),
        },
        _ => Response::error(404, format!("no route for {} {}", req.method, req.path)),
    }
}
