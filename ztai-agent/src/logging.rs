//! Diagnostics as JSON lines on stderr (stdout carries violation reports only).
//! `log` key-values become top-level keys: `info!(generation = 1; "policy applied")`
//! prints `{"ts":…,"level":"info","msg":"policy applied","generation":1}`.
use std::io::Write as _;

use log::{LevelFilter, Log, Metadata, Record, kv};

struct JsonLogger {
    level: LevelFilter,
}

struct Collect<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl<'kvs> kv::VisitSource<'kvs> for Collect<'_> {
    fn visit_pair(&mut self, key: kv::Key<'kvs>, value: kv::Value<'kvs>) -> Result<(), kv::Error> {
        let v = if let Some(n) = value.to_u64() {
            serde_json::Value::from(n)
        } else if let Some(n) = value.to_i64() {
            serde_json::Value::from(n)
        } else if let Some(b) = value.to_bool() {
            serde_json::Value::from(b)
        } else {
            serde_json::Value::from(value.to_string())
        };
        self.0.insert(key.as_str().to_string(), v);
        Ok(())
    }
}

impl Log for JsonLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level && metadata.target().starts_with("ztai")
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut obj = serde_json::Map::new();
        obj.insert("ts".into(), crate::report::rfc3339_now().into());
        obj.insert("level".into(), record.level().as_str().to_ascii_lowercase().into());
        obj.insert("msg".into(), record.args().to_string().into());
        let _ = record.key_values().visit(&mut Collect(&mut obj));
        let line = serde_json::Value::Object(obj).to_string();
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{line}");
    }

    fn flush(&self) {}
}

pub fn init(verbose: bool) {
    let level = if verbose { LevelFilter::Debug } else { LevelFilter::Info };
    if log::set_boxed_logger(Box::new(JsonLogger { level })).is_ok() {
        log::set_max_level(level);
    }
}

