//! Checks of a run's JSON events beyond the workload's facts: every line validates
//! against `introspect/events.schema.json` (with a JSON Schema validator, formats
//! included), and the process identities join up: one process per `exec_id`, each
//! child's events naming the `exec_id` of the process that forked it.

use serde_json::Value;
use std::collections::BTreeMap;

/// The JSON Schema of an event line, as the introspect crate ships it.
pub const EVENTS_SCHEMA: &str = include_str!("../../introspect/events.schema.json");

/// Panics at the first event of `evs` that does not validate, naming the field.
pub fn check_schema(evs: &[Value]) {
    let schema: Value = serde_json::from_str(EVENTS_SCHEMA).expect("the schema is JSON");
    let v = jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("a valid JSON Schema");
    assert!(!evs.is_empty(), "no events");
    for e in evs {
        if let Err(err) = v.validate(e) {
            panic!(
                "event breaks the schema: {err} at {}: {e}",
                err.instance_path()
            );
        }
    }
}

/// The string field `k` of `e`, if it is one.
fn s<'a>(e: &'a Value, k: &str) -> Option<&'a str> {
    e[k].as_str()
}

/// Panics unless the identities of `evs` are consistent: one run; every `exec_id` names one
/// process id; each new process's events carry the `child_exec_id` its fork gave it, and
/// while the forking process is still their parent, its `exec_id` as `parent_exec_id`.
pub fn check_lineage(evs: &[Value]) {
    let run = s(&evs[0], "run_id").expect("run_id");
    let mut tgid_of: BTreeMap<&str, i64> = BTreeMap::new();
    for e in evs {
        assert_eq!(s(e, "run_id"), Some(run), "{e}");
        assert!(s(e, "time").is_some(), "no wall-clock time: {e}");
        if let (Some(id), Some(tgid)) = (s(e, "exec_id"), e["tgid"].as_i64()) {
            let first = *tgid_of.entry(id).or_insert(tgid);
            assert_eq!(first, tgid, "{id} names two processes: {e}");
        }
    }
    let mut children = 0;
    for f in evs
        .iter()
        .filter(|e| e["event"] == "fork" && e["thread"] == false)
    {
        let (Some(child), Some(parent)) = (s(f, "child_exec_id"), s(f, "exec_id")) else {
            continue;
        };
        let parent_tgid = f["tgid"].as_i64();
        for e in evs.iter().filter(|e| s(e, "exec_id") == Some(child)) {
            assert_eq!(e["tgid"], f["child_tgid"], "{e} vs its fork {f}");
            if e["ppid"].as_i64() == parent_tgid {
                assert_eq!(s(e, "parent_exec_id"), Some(parent), "{e} vs its fork {f}");
                children += 1;
            }
        }
    }
    assert!(children > 0, "no child event to join to its parent");
}
