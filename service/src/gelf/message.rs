//! Building one GELF 1.1 message (a JSON object) from a `tracing` event and
//! the fields of the spans around it.
//!
//! Runs on the thread that logged, so it does only what must happen there:
//! copy the fields out of the event and the spans' stored fields. Encoding,
//! compression and chunking happen on the sender thread.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Number, Value};
use tracing::field::{Field, Visit};
use tracing::{Level, Metadata};

/// GELF version this module writes.
pub const GELF_VERSION: &str = "1.1";
/// Longest `short_message`, in characters; longer messages (and messages
/// with more than one line) also go whole into `full_message`.
pub const SHORT_MESSAGE_MAX_CHARS: usize = 250;

/// Fields recorded on a span, stored in the span's extensions when it is
/// created and updated by `Span::record`, keyed by their `tracing` names.
#[derive(Debug, Default, Clone)]
pub(crate) struct SpanFields(pub(crate) Map<String, Value>);

/// Collects `tracing` fields into a JSON map, keeping numbers and booleans
/// as JSON numbers and booleans.
pub(crate) struct FieldCollector<'a>(pub(crate) &'a mut Map<String, Value>);

impl FieldCollector<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        self.0.insert(field.name().to_owned(), value);
    }
}

impl Visit for FieldCollector<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity: keep those readable as text.
        let value =
            Number::from_f64(value).map_or_else(|| Value::String(value.to_string()), Value::Number);
        self.put(field, value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_i128(&mut self, field: &Field, value: i128) {
        let value =
            i64::try_from(value).map_or_else(|_| Value::String(value.to_string()), Value::from);
        self.put(field, value);
    }
    fn record_u128(&mut self, field: &Field, value: u128) {
        let value =
            u64::try_from(value).map_or_else(|_| Value::String(value.to_string()), Value::from);
        self.put(field, value);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
}

/// GELF `level`: the syslog severity of a `tracing` level.
pub fn syslog_level(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// The GELF key for an additional field named `name`: `_` + the name, with
/// characters GELF does not allow in keys (outside `[A-Za-z0-9_.-]`)
/// replaced by `_`. `id` becomes `_id_`, because GELF reserves `_id`.
pub fn additional_field_key(name: &str) -> String {
    let sanitized: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if sanitized == "id" {
        "_id_".to_owned()
    } else {
        format!("_{sanitized}")
    }
}

/// GELF `timestamp`: seconds since the Unix epoch, with microseconds as
/// decimals.
pub fn gelf_timestamp(now: SystemTime) -> f64 {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    since_epoch.as_micros() as f64 / 1_000_000.0
}

/// Splits a log message into GELF's `short_message` and, when the message
/// has several lines or is longer than [`SHORT_MESSAGE_MAX_CHARS`],
/// `full_message`. An empty message (GELF forbids one) is replaced by
/// `fallback`.
pub fn split_message(message: &str, fallback: &str) -> (String, Option<String>) {
    let first_line = message.lines().next().unwrap_or("").trim_end();
    let short: String = first_line.chars().take(SHORT_MESSAGE_MAX_CHARS).collect();
    let is_whole = short.len() == message.len();
    let short = if short.trim().is_empty() {
        fallback.to_owned()
    } else {
        short
    };
    let full = (!is_whole && !message.is_empty()).then(|| message.to_owned());
    (short, full)
}

/// Everything about an event that is known on the logging thread.
pub(crate) struct EventRecord<'a> {
    pub(crate) metadata: &'a Metadata<'a>,
    /// Fields of the enclosing spans, outermost first.
    pub(crate) span_fields: Vec<Map<String, Value>>,
    /// Fields of the event itself, `message` included.
    pub(crate) event_fields: Map<String, Value>,
    pub(crate) now: SystemTime,
}

/// Builds the GELF JSON object for one event.
///
/// Later sources win on a name clash: static fields, then the event's
/// target, file and line, then span fields from outermost to innermost, then
/// the event's own fields.
pub(crate) fn build_message(
    host: &str,
    static_fields: &[(String, Value)],
    record: EventRecord<'_>,
) -> Map<String, Value> {
    let EventRecord {
        metadata,
        span_fields,
        mut event_fields,
        now,
    } = record;
    let mut gelf = Map::new();
    for (key, value) in static_fields {
        gelf.insert(key.clone(), value.clone());
    }
    gelf.insert("_target".into(), Value::from(metadata.target()));
    if let Some(file) = metadata.file() {
        gelf.insert("_file".into(), Value::from(file));
    }
    if let Some(line) = metadata.line() {
        gelf.insert("_line".into(), Value::from(line));
    }
    for fields in span_fields {
        for (name, value) in fields {
            gelf.insert(additional_field_key(&name), value);
        }
    }
    let message = match event_fields.remove("message") {
        Some(Value::String(text)) => text,
        Some(other) => other.to_string(),
        None => String::new(),
    };
    for (name, value) in event_fields {
        gelf.insert(additional_field_key(&name), value);
    }
    let (short, full) = split_message(&message, metadata.target());
    insert_required(
        &mut gelf,
        host,
        short,
        full,
        syslog_level(metadata.level()),
        now,
    );
    gelf
}

/// The message the sender thread writes when log messages were dropped;
/// built without `tracing` so reporting a drop cannot itself be dropped into
/// a full queue or recurse into this layer.
pub(crate) fn build_drop_report(
    host: &str,
    static_fields: &[(String, Value)],
    dropped_since_last_report: u64,
    dropped_total: u64,
    now: SystemTime,
) -> Map<String, Value> {
    let mut gelf = Map::new();
    for (key, value) in static_fields {
        gelf.insert(key.clone(), value.clone());
    }
    gelf.insert("_target".into(), Value::from(module_path!()));
    gelf.insert("_dropped".into(), Value::from(dropped_since_last_report));
    gelf.insert("_dropped_total".into(), Value::from(dropped_total));
    let short = format!(
        "GELF logging dropped {dropped_since_last_report} messages ({dropped_total} since start): queue full or message too large"
    );
    insert_required(
        &mut gelf,
        host,
        short,
        None,
        syslog_level(&Level::WARN),
        now,
    );
    gelf
}

fn insert_required(
    gelf: &mut Map<String, Value>,
    host: &str,
    short: String,
    full: Option<String>,
    level: u8,
    now: SystemTime,
) {
    gelf.insert("version".into(), Value::from(GELF_VERSION));
    gelf.insert("host".into(), Value::from(host));
    gelf.insert("short_message".into(), Value::from(short));
    if let Some(full) = full {
        gelf.insert("full_message".into(), Value::from(full));
    }
    let timestamp = Number::from_f64(gelf_timestamp(now)).unwrap_or_else(|| Number::from(0));
    gelf.insert("timestamp".into(), Value::Number(timestamp));
    gelf.insert("level".into(), Value::from(level));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn levels_map_to_syslog_severities() {
        assert_eq!(syslog_level(&Level::ERROR), 3);
        assert_eq!(syslog_level(&Level::WARN), 4);
        assert_eq!(syslog_level(&Level::INFO), 6);
        assert_eq!(syslog_level(&Level::DEBUG), 7);
        assert_eq!(syslog_level(&Level::TRACE), 7);
    }

    #[test]
    fn additional_keys_are_prefixed_sanitized_and_avoid_id() {
        assert_eq!(additional_field_key("disk"), "_disk");
        assert_eq!(additional_field_key("agent_id"), "_agent_id");
        assert_eq!(additional_field_key("log.target"), "_log.target");
        assert_eq!(additional_field_key("a b/c"), "_a_b_c");
        assert_eq!(additional_field_key("id"), "_id_");
    }

    #[test]
    fn one_short_line_has_no_full_message() {
        assert_eq!(
            split_message("copied 3 extents", "t"),
            ("copied 3 extents".into(), None)
        );
    }

    #[test]
    fn multi_line_message_keeps_first_line_short_and_all_in_full() {
        let message = "read failed\n  at block 17\n  at extent 3";
        let (short, full) = split_message(message, "t");
        assert_eq!(short, "read failed");
        assert_eq!(full.as_deref(), Some(message));
    }

    #[test]
    fn long_message_is_truncated_on_a_character_boundary() {
        let message = "é".repeat(300);
        let (short, full) = split_message(&message, "t");
        assert_eq!(short.chars().count(), SHORT_MESSAGE_MAX_CHARS);
        assert_eq!(full.as_deref(), Some(message.as_str()));
        let exactly = "x".repeat(SHORT_MESSAGE_MAX_CHARS);
        assert_eq!(split_message(&exactly, "t"), (exactly.clone(), None));
    }

    #[test]
    fn empty_message_falls_back_to_target() {
        assert_eq!(
            split_message("", "tideline_agent::sync"),
            ("tideline_agent::sync".into(), None)
        );
        let (short, full) = split_message("\nsecond line", "fallback");
        assert_eq!(short, "fallback");
        assert_eq!(full.as_deref(), Some("\nsecond line"));
    }

    #[test]
    fn timestamp_has_sub_second_precision() {
        let now = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        assert!((gelf_timestamp(now) - 1_700_000_000.123_456).abs() < 1e-6);
    }

    #[test]
    fn drop_report_is_a_complete_gelf_message() {
        let statics = vec![("_agent_id".to_owned(), Value::from("a-1"))];
        let report = build_drop_report("node1", &statics, 5, 12, SystemTime::now());
        assert_eq!(report["version"], "1.1");
        assert_eq!(report["host"], "node1");
        assert_eq!(report["level"], 4);
        assert_eq!(report["_dropped"], 5);
        assert_eq!(report["_dropped_total"], 12);
        assert_eq!(report["_agent_id"], "a-1");
        assert!(report["short_message"]
            .as_str()
            .unwrap()
            .contains("dropped 5"));
    }
}
