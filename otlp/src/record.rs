//! One event as the parts of an OpenTelemetry log record: its time, its event name and
//! its attributes. The attributes are the event's Elastic Common Schema fields, flattened
//! to dotted names (`process.pid`, `process.entity_id`, `process.args`, `user.id`), the
//! names ECS and OpenTelemetry's semantic conventions share since the two merged: the
//! same document `--format ecs` writes, so both outputs say the same thing.

use opentelemetry::logs::AnyValue;
use opentelemetry::Key;
use ornament_introspect::event::Event;
use ornament_introspect::lineage::RunInfo;
use ornament_introspect::ornament::ecs;
use serde_json::Value;
use std::time::SystemTime;

/// The parts of the log record of one event.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordParts {
    /// When the hit happened on the host's wall clock (the event's `time`), if known.
    pub time: Option<SystemTime>,
    /// The record's event name: `ornament.` and the event kind.
    pub event_name: &'static str,
    /// A one-line text of the event (the record's body).
    pub body: String,
    /// The ECS fields, flattened, `@timestamp` aside (it is the record's time).
    pub attributes: Vec<(Key, AnyValue)>,
}

/// The record's event name for `ev`.
pub fn event_name(ev: &Event) -> &'static str {
    match ev {
        Event::Fork(_) => "ornament.fork",
        Event::Exec(_) => "ornament.exec",
        Event::Exit(_) => "ornament.exit",
        Event::Syscall(_) => "ornament.syscall",
        Event::Setid(_) => "ornament.setid",
        Event::SyscallReturn(_) => "ornament.syscall_return",
        Event::ExecFailed(_) => "ornament.exec_failed",
        Event::Signal(_) => "ornament.signal",
        Event::SignalDeliver(_) => "ornament.signal_deliver",
    }
}

/// The parts of `ev`'s record: event `seq` of run `run`.
pub fn parts(ev: &Event, seq: u64, run: &RunInfo) -> RecordParts {
    let doc = ecs::document(ev, seq, run);
    let mut attributes = Vec::new();
    if let Value::Object(m) = &doc {
        for (k, v) in m {
            if k != "@timestamp" {
                flatten(k, v, &mut attributes);
            }
        }
    }
    RecordParts {
        time: ev
            .task()
            .time
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339(t).ok()),
        event_name: event_name(ev),
        body: ev.to_text(),
        attributes,
    }
}

/// `v` under `name`: objects become dotted names, arrays lists, scalars scalars.
fn flatten(name: &str, v: &Value, out: &mut Vec<(Key, AnyValue)>) {
    match v {
        Value::Object(m) => {
            for (k, inner) in m {
                flatten(&format!("{name}.{k}"), inner, out);
            }
        }
        Value::Null => {}
        other => {
            if let Some(a) = any(other) {
                out.push((Key::new(name.to_owned()), a));
            }
        }
    }
}

/// A JSON scalar or array as an OTLP value.
fn any(v: &Value) -> Option<AnyValue> {
    Some(match v {
        Value::Bool(b) => AnyValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AnyValue::Int(i),
            None => AnyValue::Double(n.as_f64()?),
        },
        Value::String(s) => AnyValue::String(s.clone().into()),
        Value::Array(items) => AnyValue::ListAny(Box::new(items.iter().filter_map(any).collect())),
        Value::Object(_) | Value::Null => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ornament_introspect::event::{ExecEvent, ExitEvent, TaskHeader};

    fn run() -> RunInfo {
        RunInfo {
            run_id: "0b0e7c1e-1d2a-4c55-9a5e-6a0c2f3b4d5e".into(),
            host: Some("h1".into()),
        }
    }

    fn attr<'a>(p: &'a RecordParts, name: &str) -> &'a AnyValue {
        &p.attributes
            .iter()
            .find(|(k, _)| k.as_str() == name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", p.attributes))
            .1
    }

    #[test]
    fn an_exec_carries_its_process_identity_and_argv() {
        let ev = Event::Exec(ExecEvent {
            task: TaskHeader {
                pid: Some(83),
                tgid: Some(83),
                ppid: Some(1),
                uid: Some(1000),
                comm: Some("ls".into()),
                exec_id: Some("R:83:2".into()),
                parent_exec_id: Some("R:1:1".into()),
                time: Some("2026-12-03T10:00:00.123456789Z".into()),
                ..TaskHeader::default()
            },
            filename: Some("/bin/ls".into()),
            argv: vec!["ls".into(), "-l".into()],
            ..ExecEvent::default()
        });
        let p = parts(&ev, 7, &run());
        assert_eq!(p.event_name, "ornament.exec");
        assert_eq!(
            p.time,
            Some(SystemTime::UNIX_EPOCH + std::time::Duration::new(1_796_292_000, 123_456_789))
        );
        assert_eq!(attr(&p, "process.pid"), &AnyValue::Int(83));
        assert_eq!(attr(&p, "process.entity_id"), &AnyValue::from("R:83:2"));
        assert_eq!(
            attr(&p, "process.parent.entity_id"),
            &AnyValue::from("R:1:1")
        );
        assert_eq!(attr(&p, "process.executable"), &AnyValue::from("/bin/ls"));
        assert_eq!(
            attr(&p, "process.args"),
            &AnyValue::ListAny(Box::new(vec!["ls".into(), "-l".into()]))
        );
        assert_eq!(attr(&p, "user.id"), &AnyValue::from("1000"));
        assert_eq!(attr(&p, "host.name"), &AnyValue::from("h1"));
        assert_eq!(
            attr(&p, "event.id"),
            &AnyValue::from("0b0e7c1e-1d2a-4c55-9a5e-6a0c2f3b4d5e:7")
        );
        assert!(p.attributes.iter().all(|(k, _)| k.as_str() != "@timestamp"));
    }

    #[test]
    fn an_exit_by_signal_says_so_and_a_missing_time_is_none() {
        let ev = Event::Exit(ExitEvent {
            signal: Some(9),
            group_exit: true,
            ..ExitEvent::default()
        });
        let p = parts(&ev, 1, &run());
        assert_eq!(p.time, None);
        assert_eq!(p.event_name, "ornament.exit");
        assert_eq!(
            attr(&p, "event.reason"),
            &AnyValue::from("killed by signal 9")
        );
        assert!(p
            .attributes
            .iter()
            .all(|(k, _)| k.as_str() != "process.exit_code"));
    }
}
