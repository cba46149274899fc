//! A deliberately small HTTP/1.1 server and client for the admin socket.
//!
//! The controller's admin interface is JSON over HTTP/1.1 on a Unix domain
//! socket of mode 0600, so the usual tools work against it:
//!
//! ```text
//! curl --unix-socket /run/tideline/controller.sock http://localhost/v1/agents
//! ```
//!
//! One request per connection (`Connection: close`), bodies only with
//! `Content-Length`, at most [`MAX_HEAD_LEN`] bytes of request line and
//! headers and [`MAX_BODY_LEN`] bytes of body. That is all an operator CLI
//! and curl need, and it keeps the parser small enough to read in one
//! sitting. Every way a request can be wrong ends in a 4xx/5xx answer with
//! `{"error": "..."}`, never in a panic.

use std::future::Future;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;

/// Largest request line plus headers accepted.
pub const MAX_HEAD_LEN: usize = 16 * 1024;
/// Largest request body accepted.
pub const MAX_BODY_LEN: usize = 1024 * 1024;
/// Time a client has to send its whole request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time in-flight requests get to finish once the server is told to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Largest response the blocking client reads.
const MAX_RESPONSE_LEN: usize = 64 * 1024 * 1024;
/// Time the blocking client waits on the socket: exports and verifies of
/// large disks run for minutes before they answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(4 * 3600);

/// A parsed admin request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Method, as sent (`GET`, `POST`, ...).
    pub method: String,
    /// Path without the query string, as sent (not percent-decoded).
    pub path: String,
    /// Query parameters in order, keys and values percent-decoded.
    pub query: Vec<(String, String)>,
    /// JSON body; `Null` when the request has none.
    pub body: Value,
}

impl Request {
    /// The first value of query parameter `name`.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An admin response: a status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// A plain-text body sent instead of `body` (Prometheus exposition).
    pub text: Option<String>,
    /// JSON body (sent even when `Null`, except for 204 and 304).
    pub body: Value,
}

impl Response {
    /// 200 with a plain-text body.
    pub fn text(text: String) -> Self {
        Response {
            status: 200,
            text: Some(text),
            body: Value::Null,
        }
    }

    /// 200 with `body`.
    pub fn ok(body: Value) -> Self {
        Response {
            status: 200,
            text: None,
            body,
        }
    }

    /// `status` with `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Response {
            status,
            text: None,
            body: json!({ "error": message.into() }),
        }
    }
}

/// Serves admin requests on `socket` until `shutdown` resolves.
///
/// A socket file left by a previous run is removed first; a path that holds
/// something else, or a socket another process still listens on, is an
/// error rather than something to delete. The listener is bound under a
/// temporary name, set to mode 0600 and only then renamed into place, so the
/// socket is never reachable with wider permissions. On shutdown the server
/// stops accepting, gives in-flight requests a few seconds, and removes the
/// socket file.
pub async fn serve<H, F>(
    socket: &Path,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()>
where
    H: Fn(Request) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    remove_stale_socket(socket).await?;
    let listener = bind_private(socket)?;
    tracing::info!(socket = %socket.display(), "admin interface listening");

    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, handler.clone()));
                }
                Err(e) => {
                    // Usually EMFILE or ECONNABORTED: this connection is lost,
                    // the listener is not. Pause so a full fd table does not spin.
                    tracing::warn!(socket = %socket.display(), error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }

    drop(listener);
    if let Err(e) = std::fs::remove_file(socket) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(socket = %socket.display(), error = %e, "cannot remove admin socket");
        }
    }
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        connections.abort_all();
    }
    Ok(())
}

/// Removes a socket file that no process listens on any more.
async fn remove_stale_socket(socket: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(socket) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                socket.display()
            ),
        ));
    }
    if UnixStream::connect(socket).await.is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another process is serving on {}; is a controller already running?",
                socket.display()
            ),
        ));
    }
    std::fs::remove_file(socket)
}

/// Binds `socket` with mode 0600 from the moment it is visible.
fn bind_private(socket: &Path) -> io::Result<UnixListener> {
    let name = socket.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("admin socket path {} has no file name", socket.display()),
        )
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = socket.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, socket));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// Reads one request, answers it, closes.
async fn serve_connection<H, F>(mut stream: UnixStream, handler: H)
where
    H: Fn(Request) -> F,
    F: Future<Output = Response>,
{
    let (response, request_consumed) =
        match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)).await {
            Ok(Ok(request)) => (handler(request).await, true),
            Ok(Err(RequestError::Reply(r))) => (r, false),
            Ok(Err(RequestError::Io(e))) => {
                tracing::debug!(error = %e, "admin connection failed while reading");
                return;
            }
            Err(_) => (Response::error(408, "request not received in time"), false),
        };
    let bytes = encode_response(&response);
    // The client may already be gone; there is no one left to tell.
    let _ = stream.write_all(&bytes).await;
    let _ = stream.shutdown().await;
    if !request_consumed {
        // Closing a Unix socket with unread input makes the peer's next read
        // fail with ECONNRESET, which can hide the error answer from a client
        // still sending its (refused) body. Read and drop what it sends, for
        // a bounded time and amount.
        let drain = async {
            let mut sink = [0u8; 16 * 1024];
            let mut left = MAX_HEAD_LEN + 2 * MAX_BODY_LEN;
            while left > 0 {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    }
}

enum RequestError {
    /// Answer with this and close.
    Reply(Response),
    /// The connection failed; nothing can be answered.
    Io(io::Error),
}

fn bad_request(message: impl Into<String>) -> RequestError {
    RequestError::Reply(Response::error(400, message))
}

/// Parsed request line and the headers this server acts on.
struct Head {
    method: String,
    target: String,
    content_length: usize,
    expect_continue: bool,
}

async fn read_request(stream: &mut UnixStream) -> Result<Request, RequestError> {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(end) = find_head_end(&buf) {
            break end;
        }
        if buf.len() >= MAX_HEAD_LEN {
            return Err(RequestError::Reply(Response::error(
                431,
                format!("request line and headers exceed {MAX_HEAD_LEN} bytes"),
            )));
        }
        let mut chunk = [0u8; 4096];
        let want = chunk.len().min(MAX_HEAD_LEN + 4 - buf.len());
        let n = stream
            .read(&mut chunk[..want])
            .await
            .map_err(RequestError::Io)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                RequestError::Io(io::ErrorKind::UnexpectedEof.into())
            } else {
                bad_request("connection closed before the end of the headers")
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let (head_len, body_start) = head_end;
    if head_len > MAX_HEAD_LEN {
        return Err(RequestError::Reply(Response::error(
            431,
            format!("request line and headers exceed {MAX_HEAD_LEN} bytes"),
        )));
    }
    let head = parse_head(&buf[..head_len])?;

    if head.content_length > MAX_BODY_LEN {
        return Err(RequestError::Reply(Response::error(
            413,
            format!(
                "body of {} bytes exceeds the limit of {MAX_BODY_LEN} bytes",
                head.content_length
            ),
        )));
    }
    if head.expect_continue && buf.len() - body_start < head.content_length {
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(RequestError::Io)?;
    }

    let mut body = buf.split_off(body_start);
    // Bytes past Content-Length are ignored: one request per connection.
    body.truncate(head.content_length);
    if body.len() < head.content_length {
        let mut rest = vec![0u8; head.content_length - body.len()];
        stream.read_exact(&mut rest).await.map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                bad_request("connection closed before the end of the body")
            } else {
                RequestError::Io(e)
            }
        })?;
        body.extend_from_slice(&rest);
    }
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| bad_request(format!("body is not valid JSON: {e}")))?
    };

    let (path, query) = match head.target.split_once('?') {
        Some((p, q)) => (p.to_owned(), parse_query(q)?),
        None => (head.target, Vec::new()),
    };
    Ok(Request {
        method: head.method,
        path,
        query,
        body,
    })
}

/// Where the head ends: `(length of the head without its blank line, offset
/// of the body)`. Accepts CRLF and, leniently, bare LF line endings.
fn find_head_end(buf: &[u8]) -> Option<(usize, usize)> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(c), Some(l)) if l < c => Some((l, l + 2)),
        (Some(c), _) => Some((c, c + 4)),
        (None, Some(l)) => Some((l, l + 2)),
        (None, None) => None,
    }
}

fn parse_head(head: &[u8]) -> Result<Head, RequestError> {
    let text = std::str::from_utf8(head).map_err(|_| bad_request("headers are not UTF-8"))?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad_request(format!(
            "malformed request line {:?}",
            truncate_for_message(request_line)
        )));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(bad_request(format!(
            "malformed method {:?}",
            truncate_for_message(method)
        )));
    }
    if !target.starts_with('/') {
        return Err(bad_request(
            "request target must be a path starting with '/'",
        ));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(RequestError::Reply(Response::error(
            505,
            format!("unsupported protocol {:?}", truncate_for_message(version)),
        )));
    }

    let mut content_length: Option<usize> = None;
    let mut expect_continue = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad_request(format!(
                "malformed header line {:?}",
                truncate_for_message(line)
            )));
        };
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(bad_request(format!(
                "malformed header name {:?}",
                truncate_for_message(name)
            )));
        }
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n = parse_content_length(value)?;
            if content_length.is_some_and(|old| old != n) {
                return Err(bad_request("conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(RequestError::Reply(Response::error(
                501,
                "Transfer-Encoding is not supported; send Content-Length",
            )));
        } else if name.eq_ignore_ascii_case("expect") {
            if value.eq_ignore_ascii_case("100-continue") {
                expect_continue = true;
            } else {
                return Err(RequestError::Reply(Response::error(
                    417,
                    format!("unsupported expectation {:?}", truncate_for_message(value)),
                )));
            }
        }
    }
    Ok(Head {
        method: method.to_owned(),
        target: target.to_owned(),
        content_length: content_length.unwrap_or(0),
        expect_continue,
    })
}

fn parse_content_length(value: &str) -> Result<usize, RequestError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad_request(format!(
            "malformed Content-Length {:?}",
            truncate_for_message(value)
        )));
    }
    // A number too large for usize is certainly above the body limit.
    Ok(value.parse::<usize>().unwrap_or(usize::MAX))
}

/// Splits a query string into decoded pairs (`a=1&b`, `+` as space).
fn parse_query(query: &str) -> Result<Vec<(String, String)>, RequestError> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

fn percent_decode(s: &str) -> Result<String, RequestError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).and_then(|h| {
                    let h = std::str::from_utf8(h).ok()?;
                    u8::from_str_radix(h, 16).ok()
                });
                let Some(b) = hex else {
                    return Err(bad_request(format!(
                        "bad percent escape in query {:?}",
                        truncate_for_message(s)
                    )));
                };
                out.push(b);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| bad_request("query is not UTF-8 once decoded"))
}

/// Peer-supplied text echoed in an error, cut so that it stays readable.
fn truncate_for_message(s: &str) -> &str {
    let mut end = s.len().min(80);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        s if (200..300).contains(&s) => "Success",
        s if (400..500).contains(&s) => "Client Error",
        _ => "Server Error",
    }
}

fn encode_response(r: &Response) -> Vec<u8> {
    // A status outside 100..=999 cannot be written; it is a handler bug.
    let status = if (100..=999).contains(&r.status) {
        r.status
    } else {
        500
    };
    let (body, content_type) = if status == 204 || status == 304 {
        (Vec::new(), "application/json")
    } else if let Some(text) = &r.text {
        (text.as_bytes().to_vec(), "text/plain; version=0.0.4")
    } else {
        let mut b = serde_json::to_vec(&r.body).unwrap_or_else(|_| b"null".to_vec());
        b.push(b'\n');
        (b, "application/json")
    };
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// Why an admin request from the CLI failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing accepted the connection.
    #[error("cannot connect to the controller's admin socket {}: {source} (is the controller running, and may this user open the socket?)", socket.display())]
    Connect {
        /// The socket tried.
        socket: PathBuf,
        /// Why the connection failed.
        source: io::Error,
    },
    /// The connection failed during the exchange.
    #[error("admin request over {} failed: {source} (did the controller stop?)", socket.display())]
    Io {
        /// The socket used.
        socket: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The answer is not an HTTP response with a JSON body.
    #[error("malformed response from the controller on {}: {reason}", socket.display())]
    BadResponse {
        /// The socket used.
        socket: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The method or path cannot be put in a request line.
    #[error("invalid admin request {method} {path}: methods are upper-case letters and paths start with '/' and contain no spaces or control characters")]
    InvalidRequest {
        /// Method given.
        method: String,
        /// Path given.
        path: String,
    },
}

/// Sends one request to the admin socket and waits for the answer: its
/// status and JSON body (`Null` when empty). Blocking; for the CLI.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), ClientError> {
    let valid_method = !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase());
    let valid_path =
        path.starts_with('/') && !path.bytes().any(|b| b.is_ascii_control() || b == b' ');
    if !valid_method || !valid_path {
        return Err(ClientError::InvalidRequest {
            method: method.to_owned(),
            path: path.to_owned(),
        });
    }
    let io_err = |source| ClientError::Io {
        socket: socket.to_path_buf(),
        source,
    };
    let bad = |reason: String| ClientError::BadResponse {
        socket: socket.to_path_buf(),
        reason,
    };

    let mut stream =
        std::os::unix::net::UnixStream::connect(socket).map_err(|source| ClientError::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(CLIENT_TIMEOUT)))
        .map_err(io_err)?;

    let payload = match body {
        Some(v) => serde_json::to_vec(v).map_err(|e| bad(format!("cannot encode body: {e}")))?,
        None => Vec::new(),
    };
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    if body.is_some() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            payload.len()
        ));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(&payload);
    if let Err(e) = stream.write_all(&bytes) {
        // A server refusing the request (e.g. a body too large) answers and
        // closes before reading everything; its answer is still readable.
        if !matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ) {
            return Err(io_err(e));
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);

    let mut response = Vec::new();
    match stream
        .take(MAX_RESPONSE_LEN as u64 + 1)
        .read_to_end(&mut response)
    {
        Ok(_) => {}
        // The server answered and closed without reading all we sent; the
        // answer arrived before the reset and is complete.
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !response.is_empty() => {}
        Err(e) => return Err(io_err(e)),
    }
    if response.len() > MAX_RESPONSE_LEN {
        return Err(bad(format!("response exceeds {MAX_RESPONSE_LEN} bytes")));
    }
    parse_response(&response).map_err(bad)
}

/// Parses a whole `Connection: close` response, skipping interim 1xx ones.
fn parse_response(mut bytes: &[u8]) -> Result<(u16, Value), String> {
    loop {
        let (head_len, body_start) =
            find_head_end(bytes).ok_or("response ended inside its headers")?;
        let head = std::str::from_utf8(&bytes[..head_len])
            .map_err(|_| "response headers are not UTF-8".to_string())?;
        let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let status = match (parts.next(), parts.next()) {
            (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code
                .parse::<u16>()
                .map_err(|_| format!("bad status line {status_line:?}"))?,
            _ => return Err(format!("bad status line {status_line:?}")),
        };
        let rest = &bytes[body_start..];
        if (100..200).contains(&status) {
            bytes = rest;
            continue;
        }
        let mut content_length = None;
        for line in lines {
            if let Some((name, value)) = line.split_once(':') {
                if name.trim().eq_ignore_ascii_case("content-length") {
                    content_length = Some(
                        value
                            .trim()
                            .parse::<usize>()
                            .map_err(|_| format!("bad Content-Length {value:?}"))?,
                    );
                }
            }
        }
        let body = match content_length {
            Some(n) if n > rest.len() => {
                return Err(format!("body truncated: {} of {n} bytes", rest.len()))
            }
            Some(n) => &rest[..n],
            None => rest,
        };
        let value = if body.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?
        };
        return Ok((status, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    /// A running server whose handler echoes the request back as JSON.
    struct Running {
        dir: tempfile::TempDir,
        socket: PathBuf,
        stop: Option<oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<io::Result<()>>,
    }

    async fn echo(req: Request) -> Response {
        let status = if req.method == "POST" { 201 } else { 200 };
        Response {
            status,
            text: None,
            body: json!({
                "method": req.method,
                "path": req.path,
                "query": req.query,
                "body": req.body,
            }),
        }
    }

    async fn start() -> Running {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("controller.sock");
        let (stop, stopped) = oneshot::channel::<()>();
        let path = socket.clone();
        let task = tokio::spawn(async move {
            serve(&path, echo, async {
                let _ = stopped.await;
            })
            .await
        });
        for _ in 0..200 {
            if UnixStream::connect(&socket).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Running {
            dir,
            socket,
            stop: Some(stop),
            task,
        }
    }

    impl Running {
        async fn call(
            &self,
            method: &'static str,
            path: &'static str,
            body: Option<Value>,
        ) -> Result<(u16, Value), ClientError> {
            let socket = self.socket.clone();
            tokio::task::spawn_blocking(move || request(&socket, method, path, body.as_ref()))
                .await
                .expect("client thread")
        }

        async fn raw(&self, bytes: &[u8]) -> String {
            let mut s = UnixStream::connect(&self.socket).await.expect("connect");
            // The server may answer and close before reading everything.
            let _ = s.write_all(bytes).await;
            let _ = s.shutdown().await;
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).into_owned()
        }

        async fn stop(mut self) {
            if let Some(s) = self.stop.take() {
                let _ = s.send(());
            }
            self.task.await.expect("server task").expect("serve");
            assert!(
                !self.socket.exists(),
                "socket file left behind after shutdown"
            );
            drop(self.dir);
        }
    }

    fn status_of(raw: &str) -> u16 {
        raw.split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {raw:?}"))
    }

    fn body_of(raw: &str) -> Value {
        let (_, body) = raw.split_once("\r\n\r\n").expect("head/body split");
        serde_json::from_str(body).expect("JSON body")
    }

    #[tokio::test]
    async fn get_and_post_round_trip() {
        let srv = start().await;
        let mode = std::fs::metadata(&srv.socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let (status, body) = srv
            .call(
                "GET",
                "/v1/agents?state=active&name=web%2D01+a%20b&flag",
                None,
            )
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert_eq!(body["method"], "GET");
        assert_eq!(body["path"], "/v1/agents");
        assert_eq!(
            body["query"],
            json!([["state", "active"], ["name", "web-01 a b"], ["flag", ""]])
        );
        assert_eq!(body["body"], Value::Null);

        let sent = json!({"disk": "root", "keep": [1, 2, 3], "note": "é"});
        let (status, body) = srv
            .call("POST", "/v1/agents/web-01/sync", Some(sent.clone()))
            .await
            .unwrap();
        assert_eq!(status, 201);
        assert_eq!(body["method"], "POST");
        assert_eq!(body["body"], sent);
        srv.stop().await;
    }

    #[tokio::test]
    async fn malformed_requests_get_400_with_an_error() {
        let srv = start().await;
        for bad in [
            &b"NONSENSE\r\n\r\n"[..],
            b"GET /x HTTP/1.1 extra\r\n\r\n",
            b"get /x HTTP/1.1\r\n\r\n",
            b"GET x HTTP/1.1\r\n\r\n",
            b"GET /x HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"GET /x?a=%zz HTTP/1.1\r\n\r\n",
            b"GET /x?a=%ff HTTP/1.1\r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\n{oops",
            b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}",
            b"GET /\xff HTTP/1.1\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: loc",
        ] {
            let raw = srv.raw(bad).await;
            assert_eq!(
                status_of(&raw),
                400,
                "for {:?}: {raw}",
                String::from_utf8_lossy(bad)
            );
            assert!(
                body_of(&raw)["error"]
                    .as_str()
                    .is_some_and(|e| !e.is_empty()),
                "no error text for {:?}: {raw}",
                String::from_utf8_lossy(bad)
            );
        }
        // Still serving after all that.
        let (status, _) = srv.call("GET", "/v1/health", None).await.unwrap();
        assert_eq!(status, 200);
        srv.stop().await;
    }

    #[tokio::test]
    async fn oversized_head_and_body_are_refused() {
        let srv = start().await;
        let raw = srv
            .raw(
                format!(
                    "POST /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                    MAX_BODY_LEN + 1
                )
                .as_bytes(),
            )
            .await;
        assert_eq!(status_of(&raw), 413, "{raw}");
        assert!(body_of(&raw)["error"].is_string());

        // Through the client, with the body really sent.
        let big = json!({ "pad": "x".repeat(MAX_BODY_LEN) });
        let (status, body) = srv.call("POST", "/x", Some(big)).await.unwrap();
        assert_eq!(status, 413);
        assert!(body["error"].is_string());

        let mut head = b"GET /x HTTP/1.1\r\nX-Pad: ".to_vec();
        head.extend_from_slice(&vec![b'a'; MAX_HEAD_LEN]);
        head.extend_from_slice(b"\r\n\r\n");
        let raw = srv.raw(&head).await;
        assert_eq!(status_of(&raw), 431, "{raw}");

        // A body just under the limit is accepted.
        let fits = json!("y".repeat(MAX_BODY_LEN - 16));
        let (status, body) = srv.call("POST", "/x", Some(fits.clone())).await.unwrap();
        assert_eq!(status, 201);
        assert_eq!(body["body"], fits);
        srv.stop().await;
    }

    #[tokio::test]
    async fn expect_continue_is_honoured() {
        let srv = start().await;
        let mut s = UnixStream::connect(&srv.socket).await.unwrap();
        s.write_all(b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
            .await
            .unwrap();
        // The body is sent only once the server has asked for it.
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
        let mut got = vec![0u8; interim.len()];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, interim);
        s.write_all(b"{}").await.unwrap();
        let mut rest = String::new();
        s.read_to_string(&mut rest).await.unwrap();
        assert_eq!(status_of(&rest), 201, "{rest}");
        assert_eq!(body_of(&rest)["body"], json!({}));
        srv.stop().await;
    }

    #[tokio::test]
    async fn stale_socket_is_replaced_but_live_one_and_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("admin.sock");
        // A socket file whose listener is gone, as after a crash.
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        assert!(socket.exists());
        let (stop, stopped) = oneshot::channel::<()>();
        let path = socket.clone();
        let first = tokio::spawn(async move {
            serve(&path, echo, async {
                let _ = stopped.await;
            })
            .await
        });
        let mut up = false;
        for _ in 0..200 {
            if std::fs::metadata(&socket).is_ok_and(|m| m.permissions().mode() & 0o777 == 0o600)
                && UnixStream::connect(&socket).await.is_ok()
            {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(up, "server did not take over the stale socket");

        // A second server must not steal the live socket.
        let err = serve(&socket, echo, std::future::pending())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        let _ = stop.send(());
        first.await.unwrap().unwrap();

        // A regular file at the path is never deleted.
        std::fs::write(&socket, b"not a socket").unwrap();
        let err = serve(&socket, echo, std::future::pending())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&socket).unwrap(), b"not a socket");
    }

    #[test]
    fn client_error_names_the_socket_and_suggests_the_controller_is_down() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("missing.sock");
        let err = request(&socket, "GET", "/v1/agents", None).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
        assert!(text.contains(&socket.display().to_string()), "{text}");
        assert!(text.contains("controller running"), "{text}");
        assert!(matches!(
            request(&socket, "GET", "/x\r\nEvil: 1", None),
            Err(ClientError::InvalidRequest { .. })
        ));
    }

    #[test]
    fn response_parser_handles_interim_and_bounds() {
        let ok = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 16\r\n\r\n{\"error\":\"nope\"}";
        assert_eq!(parse_response(ok).unwrap(), (404, json!({"error": "nope"})));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}").is_err());
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert_eq!(
            parse_response(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap(),
            (204, Value::Null)
        );
    }
}
