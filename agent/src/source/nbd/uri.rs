//! NBD URIs, as in the NBD URI specification (`doc/uri.md` of the
//! NetworkBlockDevice/nbd repository), restricted to what the agent uses:
//!
//! * `nbd://host[:port][/export]`: TCP, default port 10809. `host` may be a
//!   name, an IPv4 address or a bracketed IPv6 address.
//! * `nbd+unix:///[export]?socket=PATH`: a Unix domain socket; the
//!   authority must be empty.
//!
//! The export name is the path after the first `/`, percent-decoded; it may
//! be empty (the server's default export). TLS schemes (`nbds://`) are not
//! supported.

use std::path::PathBuf;

/// Default NBD TCP port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP host and port.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix domain socket.
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Where to connect.
    pub endpoint: Endpoint,
    /// Export name (may be empty).
    pub export: String,
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape at byte {i}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent escapes do not decode to UTF-8".to_owned())
}

/// Parses an `nbd://` or `nbd+unix://` URI; the error says what is wrong.
pub fn parse(uri: &str) -> Result<Target, String> {
    let (unix, rest) = if let Some(r) = uri.strip_prefix("nbd+unix://") {
        (true, r)
    } else if let Some(r) = uri.strip_prefix("nbd://") {
        (false, r)
    } else {
        return Err("scheme must be nbd:// or nbd+unix://".into());
    };
    let (rest, fragment) = rest.split_once('#').unwrap_or((rest, ""));
    if !fragment.is_empty() {
        return Err("fragments are not allowed".into());
    }
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let export = percent_decode(path)?;
    if export.len() > 4096 {
        return Err("export name longer than 4096 bytes".into());
    }
    let mut socket = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "socket" if unix => socket = Some(PathBuf::from(percent_decode(v)?)),
            _ => return Err(format!("unsupported query parameter {k:?}")),
        }
    }
    let endpoint = if unix {
        if !authority.is_empty() {
            return Err(
                "nbd+unix:// URIs must have an empty host (nbd+unix:///export?socket=PATH)".into(),
            );
        }
        match socket {
            Some(p) if !p.as_os_str().is_empty() => Endpoint::Unix(p),
            _ => return Err("nbd+unix:// URI without ?socket=PATH".into()),
        }
    } else {
        if authority.contains('@') {
            return Err("user names are not supported".into());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or("unterminated [ in IPv6 host")?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err("nbd:// URI without a host".into());
        }
        let port = match port {
            None | Some("") => DEFAULT_PORT,
            Some(p) => p.parse().map_err(|_| format!("bad port {p:?}"))?,
        };
        Endpoint::Tcp {
            host: host.to_owned(),
            port,
        }
    };
    Ok(Target { endpoint, export })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> Target {
        Target {
            endpoint: Endpoint::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn tcp_uris() {
        assert_eq!(
            parse("nbd://example.com").unwrap(),
            tcp("example.com", 10809, "")
        );
        assert_eq!(parse("nbd://h/").unwrap(), tcp("h", 10809, ""));
        assert_eq!(parse("nbd://h:1234/disk").unwrap(), tcp("h", 1234, "disk"));
        assert_eq!(parse("nbd://h:/a%2Fb").unwrap(), tcp("h", 10809, "a/b"));
        assert_eq!(parse("nbd://[::1]:99/x").unwrap(), tcp("::1", 99, "x"));
        assert_eq!(parse("nbd://[::1]/x").unwrap(), tcp("::1", 10809, "x"));
        assert_eq!(
            parse("nbd://127.0.0.1/with/slash").unwrap(),
            tcp("127.0.0.1", 10809, "with/slash")
        );
    }

    #[test]
    fn unix_uris() {
        let t = parse("nbd+unix:///?socket=/run/nbd.sock").unwrap();
        assert_eq!(t.endpoint, Endpoint::Unix("/run/nbd.sock".into()));
        assert_eq!(t.export, "");
        let t = parse("nbd+unix:///vm1?socket=/tmp/a%20b.sock").unwrap();
        assert_eq!(t.endpoint, Endpoint::Unix("/tmp/a b.sock".into()));
        assert_eq!(t.export, "vm1");
    }

    #[test]
    fn bad_uris_say_why() {
        for (uri, why) in [
            ("file:///x", "scheme"),
            ("nbd://", "without a host"),
            ("nbd://h:99999/", "bad port"),
            ("nbd://h:x/", "bad port"),
            ("nbd+unix:///x", "socket"),
            ("nbd+unix://host/x?socket=/s", "empty host"),
            ("nbd://h/x?socket=/s", "unsupported query"),
            ("nbd://h/%zz", "percent"),
            ("nbd://[::1/x", "IPv6"),
            ("nbd://u@h/x", "user"),
        ] {
            let err = parse(uri).unwrap_err();
            assert!(err.contains(why), "{uri}: {err}");
        }
    }
}
