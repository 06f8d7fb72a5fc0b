//! The ECS document of each kind of event, field by field, and against ECS's published
//! definitions.

use super::*;
use crate::event::tests::{samples, RUN_ID};

fn run() -> RunInfo {
    RunInfo {
        run_id: RUN_ID.into(),
        host: Some("builder".into()),
    }
}

#[test]
fn each_kind_maps_to_ecs_fields() {
    let docs: Vec<Value> = samples()
        .iter()
        .enumerate()
        .map(|(i, e)| document(e, u64::try_from(i).expect("small") + 1, &run()))
        .collect();
    let id = |s: &str| Value::from(format!("{RUN_ID}:{s}"));
    let [fork, exec, exit, syscall, setid, ret, failed, signal, deliver] = &docs[..] else {
        panic!("nine samples");
    };
    assert_eq!(ret["event"]["action"], "mkdirat-return");
    assert_eq!(
        (&ret["event"]["outcome"], &ret["error"]["code"]),
        (&"failure".into(), &"EEXIST".into())
    );
    assert_eq!(
        (&failed["event"]["action"], &failed["file"]["path"]),
        (&"exec".into(), &"/no/such".into())
    );
    assert_eq!(failed["error"]["code"], "ENOENT");
    assert_eq!(signal["event"]["code"], "15");
    assert_eq!(
        signal["event"]["reason"],
        "SIGTERM to pid 43 (thread 44) from the task"
    );
    assert_eq!(deliver["event"]["type"], serde_json::json!(["end"]));
    let p = &fork["process"];
    assert_eq!(fork["@timestamp"], "2026-12-03T07:30:01.500000000Z");
    assert_eq!(fork["event"]["type"], serde_json::json!(["start"]));
    assert_eq!((&p["pid"], &p["entity_id"]), (&43.into(), &id("43:3")));
    assert_eq!(
        (&p["parent"]["pid"], &p["parent"]["entity_id"]),
        (&42.into(), &id("42:2"))
    );
    assert_eq!(exec["process"]["args"], serde_json::json!(["ls", "-l"]));
    assert_eq!(exec["process"]["executable"], "/bin/ls");
    assert_eq!(exec["process"]["working_directory"], "/home/u");
    assert_eq!(exec["process"]["entity_id"], id("42:2"));
    assert_eq!(exec["process"]["parent"]["entity_id"], id("1:1"));
    assert_eq!(exit["process"]["exit_code"], 3);
    assert_eq!(exit["event"]["type"], serde_json::json!(["end"]));
    assert_eq!(syscall["event"]["action"], "mkdirat");
    assert_eq!(syscall["file"]["path"], "/tmp/x");
    assert_eq!(setid["process"]["user"]["id"], "1000");
    for (i, d) in docs.iter().enumerate() {
        assert_eq!(d["host"]["name"], "builder");
        assert_eq!(d["user"]["id"], "0");
        assert_eq!(d["event"]["sequence"], i + 1);
        assert_eq!(d["event"]["id"], format!("{RUN_ID}:{}", i + 1));
    }
}

#[test]
fn every_field_is_an_ecs_field_of_its_type() {
    let flat = ornament_test_gate::require!(
        "ECS's field definitions (npm and node, or a cached ecs_flat.json)",
        ornament_tests::ecs::ecs_flat()
    );
    let mut names = std::collections::BTreeSet::new();
    let mut events = samples();
    // A signal's exit and a denied syscall have fields of their own.
    if let Event::Exit(x) = &mut events[2] {
        x.signal = Some(9);
    }
    events.extend(samples());
    if let Event::Syscall(s) = &mut events[3] {
        s.denied = Some(13);
    }
    for (i, e) in events.iter().enumerate() {
        let d = document(e, u64::try_from(i).expect("small") + 1, &run());
        names.extend(ornament_tests::ecs::check_ecs(&d, &flat));
    }
    for name in [
        "@timestamp",
        "event.kind",
        "event.category",
        "event.type",
        "event.action",
        "event.outcome",
        "event.reason",
        "error.code",
        "process.pid",
        "process.entity_id",
        "process.parent.entity_id",
        "process.executable",
        "process.args",
        "process.exit_code",
        "user.id",
        "host.name",
    ] {
        assert!(names.contains(name), "{name} never written");
    }
    // A field ECS does not have, or one of the wrong type, is caught.
    let doc = document(&events[0], 1, &run());
    for bad in [
        serde_json::json!({"process": {"vcpu": 1}}),
        serde_json::json!({"process": {"pid": "43"}}),
        serde_json::json!({"event": {"category": "process"}}),
        serde_json::json!({"event": {"kind": "happening"}}),
    ] {
        let mut d = doc.clone();
        merge(&mut d, &bad);
        let flat = flat.clone();
        let caught = std::panic::catch_unwind(move || ornament_tests::ecs::check_ecs(&d, &flat));
        assert!(caught.is_err(), "{bad} accepted");
    }
}

/// `patch`'s leaves written over `v`'s.
fn merge(v: &mut Value, patch: &Value) {
    match (v, patch) {
        (Value::Object(o), Value::Object(p)) => {
            for (k, pv) in p {
                merge(o.entry(k.clone()).or_insert(Value::Null), pv);
            }
        }
        (v, p) => *v = p.clone(),
    }
}
