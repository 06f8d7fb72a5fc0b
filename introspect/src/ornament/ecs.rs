//! `--format ecs`: each event as an Elastic Common Schema document, so that Elastic,
//! OpenSearch and the SIEMs that read ECS take ornament's events with no mapping of
//! their own. Only fields ECS defines are written ([`ECS_VERSION`]'s `ecs_flat`: names and
//! types are checked by the tests against the published definitions).
//!
//! | event   | `event.category`, `event.type` | `process` is |
//! |---------|--------------------------------|--------------|
//! | fork    | process, start                 | the new process (a new thread: its process), `process.parent` the forking one |
//! | exec    | process, start                 | the process after its exec: `executable`, `args` |
//! | exit    | process, end                   | the exiting process: `exit_code`, or `event.reason` for a signal |
//! | syscall | process, info                  | the caller; `event.action` the syscall's name, `event.code` its number, `file.path` its path argument; a denied one has `event.outcome: failure`, `error.code` the errno |
//! | setid   | process, change                | the task with its new ids |

use crate::event::{Event, TaskHeader};
use crate::lineage::RunInfo;
use serde_json::{Map, Value};

/// The ECS version the documents follow (`ecs.version`).
pub const ECS_VERSION: &str = "9.4.0";

/// Sets the ECS field `name` (dotted) in `doc`, nesting objects; `None` sets nothing.
fn put(doc: &mut Map<String, Value>, name: &str, value: Option<Value>) {
    let Some(value) = value else {
        return;
    };
    match name.split_once('.') {
        Some((head, rest)) if head != "@timestamp" => {
            let slot = doc.entry(head).or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(inner) = slot {
                put(inner, rest, Some(value));
            }
        }
        _ => {
            doc.insert(name.to_owned(), value);
        }
    }
}

/// An id as ECS keeps it: a keyword (string).
fn keyword(id: Option<u32>) -> Option<Value> {
    id.map(|v| Value::from(v.to_string()))
}

/// The ECS document of `ev`, line `seq` of run `run`.
pub fn document(ev: &Event, seq: u64, run: &RunInfo) -> Value {
    let t = ev.task();
    let mut d = Map::new();
    let s = |v: &Option<String>| v.clone().map(Value::from);
    put(&mut d, "@timestamp", s(&t.time));
    put(&mut d, "ecs.version", Some(ECS_VERSION.into()));
    put(&mut d, "agent.type", Some("ornament".into()));
    put(
        &mut d,
        "agent.version",
        Some(env!("CARGO_PKG_VERSION").into()),
    );
    put(&mut d, "host.name", run.host.clone().map(Value::from));
    put(&mut d, "event.kind", Some("event".into()));
    put(&mut d, "event.module", Some("ornament".into()));
    put(&mut d, "event.dataset", Some("ornament.events".into()));
    put(&mut d, "event.sequence", Some(seq.into()));
    put(
        &mut d,
        "event.id",
        Some(format!("{}:{seq}", run.run_id).into()),
    );
    put(&mut d, "user.id", keyword(t.uid));
    put(&mut d, "group.id", keyword(t.gid));
    put(&mut d, "process.real_user.id", keyword(t.uid));
    put(&mut d, "process.user.id", keyword(t.euid));
    put(&mut d, "process.real_group.id", keyword(t.gid));
    let (kind_type, action) = match ev {
        Event::Fork(_) | Event::Exec(_) => ("start", ev.kind().as_str().to_owned()),
        Event::Exit(_) => ("end", "exit".to_owned()),
        Event::Syscall(e) => (
            "info",
            e.name
                .clone()
                .unwrap_or_else(|| format!("syscall-{}", e.nr)),
        ),
        Event::Setid(_) => ("change", "setid".to_owned()),
        Event::SyscallReturn(e) => (
            "info",
            format!(
                "{}-return",
                e.name
                    .clone()
                    .unwrap_or_else(|| format!("syscall-{}", e.nr))
            ),
        ),
        // An attempt to start a program that did not start.
        Event::ExecFailed(_) => ("start", "exec".to_owned()),
        Event::Signal(_) => ("info", "signal".to_owned()),
        Event::SignalDeliver(e) => (
            match e.action {
                crate::event::SignalAction::Kill => "end",
                crate::event::SignalAction::Stop => "change",
                _ => "info",
            },
            "signal-deliver".to_owned(),
        ),
    };
    put(&mut d, "event.category", Some(vec!["process"].into()));
    put(&mut d, "event.type", Some(vec![kind_type].into()));
    put(&mut d, "event.action", Some(action.into()));
    match ev {
        Event::Fork(f) if !f.thread => {
            // The new process, forked by the task of the header.
            put(&mut d, "process.pid", f.child_tgid.map(Value::from));
            put(&mut d, "process.thread.id", f.child_pid.map(Value::from));
            put(&mut d, "process.entity_id", s(&f.child_exec_id));
            put(&mut d, "process.name", s(&t.comm));
            put(&mut d, "process.start", s(&t.time));
            parent(&mut d, t.tgid, &t.exec_id);
            put(&mut d, "process.parent.name", s(&t.comm));
            put(&mut d, "process.parent.thread.id", t.pid.map(Value::from));
        }
        Event::Fork(f) => {
            // A new thread of the header's process.
            process(&mut d, t);
            put(&mut d, "process.thread.id", f.child_pid.map(Value::from));
        }
        Event::Exec(e) => {
            process(&mut d, t);
            put(&mut d, "process.executable", s(&e.filename));
            put(&mut d, "process.working_directory", s(&e.cwd));
            put(&mut d, "process.args", Some(e.argv.clone().into()));
            put(&mut d, "process.args_count", Some(e.argv.len().into()));
        }
        Event::Exit(e) => {
            process(&mut d, t);
            put(&mut d, "process.end", s(&t.time));
            match e.signal {
                None => put(&mut d, "process.exit_code", Some(e.exit_code.into())),
                Some(sig) => {
                    let core = if e.core_dumped { " (core dumped)" } else { "" };
                    put(
                        &mut d,
                        "event.reason",
                        Some(format!("killed by signal {sig}{core}").into()),
                    );
                }
            }
        }
        Event::Syscall(e) => {
            process(&mut d, t);
            put(&mut d, "event.code", Some(e.nr.to_string().into()));
            put(&mut d, "file.path", s(&e.path));
            if let Some(errno) = e.denied {
                put(&mut d, "event.outcome", Some("failure".into()));
                let name = crate::probes::errno_name(errno)
                    .map_or_else(|| errno.to_string(), str::to_owned);
                put(&mut d, "error.code", Some(name.into()));
            }
        }
        Event::Setid(_) => process(&mut d, t),
        Event::SyscallReturn(e) => {
            process(&mut d, t);
            put(&mut d, "event.code", Some(e.nr.to_string().into()));
            if let Some(errno) = &e.errno {
                put(&mut d, "event.outcome", Some("failure".into()));
                put(&mut d, "error.code", Some(errno.clone().into()));
            } else if e.ret.is_some() {
                put(&mut d, "event.outcome", Some("success".into()));
            }
        }
        Event::Signal(e) => {
            process(&mut d, t);
            put(&mut d, "event.code", Some(e.signal.to_string().into()));
            // ECS has no field for a signal's target: the reason says it.
            let opt = |v: Option<i32>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
            let reason = format!(
                "{} to pid {} (thread {}) from the {}",
                e.signal_name,
                opt(e.target_tgid),
                opt(e.target_pid),
                match e.origin {
                    crate::event::SignalOrigin::Task => "task",
                    crate::event::SignalOrigin::Kernel => "kernel",
                }
            );
            put(&mut d, "event.reason", Some(reason.into()));
        }
        Event::SignalDeliver(e) => {
            process(&mut d, t);
            put(&mut d, "event.code", Some(e.signal.to_string().into()));
            put(&mut d, "event.reason", Some(e.signal_name.clone().into()));
        }
        Event::ExecFailed(e) => {
            process(&mut d, t);
            put(&mut d, "file.path", s(&e.filename));
            put(&mut d, "event.outcome", Some("failure".into()));
            put(&mut d, "error.code", Some(e.errno_name.clone().into()));
        }
    }
    Value::Object(d)
}

/// `process.*` of the task of `t` (its process, thread, name and parent).
fn process(d: &mut Map<String, Value>, t: &TaskHeader) {
    put(d, "process.pid", t.tgid.map(Value::from));
    put(d, "process.thread.id", t.pid.map(Value::from));
    put(d, "process.name", t.comm.clone().map(Value::from));
    put(d, "process.entity_id", t.exec_id.clone().map(Value::from));
    parent(d, t.ppid, &t.parent_exec_id);
}

fn parent(d: &mut Map<String, Value>, pid: Option<i32>, id: &Option<String>) {
    put(d, "process.parent.pid", pid.map(Value::from));
    put(d, "process.parent.entity_id", id.clone().map(Value::from));
}

#[cfg(test)]
mod tests;
