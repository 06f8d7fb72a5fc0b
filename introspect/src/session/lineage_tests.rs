//! Process identities and wall-clock times over the fake engine: a shell forks a child that
//! forks a grandchild; both end, and the shell forks again into the same pids. Every event
//! the session delivers, written as JSON, validates against the schema, and each process's
//! `exec_id` is the `parent_exec_id` of its children's events, a reused pid a new process.

use super::tests::limits;
use super::*;
use crate::event::tests::{schema_validator, SharedBuf};
use crate::fake_engine::{FakeEngine, Step};
use crate::lineage::{Lineage, RunInfo};
use crate::ornament::{EventWriter, Format};
use crate::testing::{committed_profiles, SynthConfig, SynthGuest, TaskSpec};
use ornament_engine::Gva;
use std::time::UNIX_EPOCH;

const RUN: &str = "9d2c5b1a-7e6f-4a3b-b2c1-d0e9f8a7b6c5";

/// 2026-12-03T07:30:00Z.
const NOW_S: u64 = 1_796_283_000;

/// The lines `format` gets from a session on `caps` over a guest of profile `p` where sh
/// (10) forks and execs 11, which forks and execs 12; both exit, then the same again into
/// two new processes with the same pids (their creds differ).
fn reuse_run(caps: Capabilities, p: Profile, format: Format) -> Vec<serde_json::Value> {
    let mut g = SynthGuest::new(p, SynthConfig::default()).expect("guest");
    let sh = g
        .add_task(&TaskSpec::user(10, "sh", "/bin/sh", &["sh"]))
        .expect("sh");
    let mut task = |pid: i32, parent: Gva, creds: [u32; 4]| {
        let mut t = TaskSpec::user(pid, "w", "/bin/w", &["w"]);
        t.parent = Some(parent);
        t.creds = creds;
        g.add_task(&t).expect("task")
    };
    // The first child and grandchild, then two new processes with their pids.
    let a = task(11, sh, [0; 4]);
    let ga = task(12, a, [1000, 1001, 1002, 1003]);
    let b = task(11, sh, [0; 4]);
    let gb = task(12, b, [5, 6, 7, 8]);
    let g = Arc::new(g);
    let life = |parent: Gva, t: Gva| {
        [
            Step::hit("proc_fork_connector", parent, t.raw()),
            Step::hit("proc_exec_connector", t, t.raw()),
        ]
    };
    let end = |t: Gva| Step::hit("proc_exit_connector", t, t.raw());
    let mut script = Vec::new();
    script.extend(life(sh, a));
    script.extend(life(a, ga));
    script.extend([end(ga), end(a)]);
    script.extend(life(sh, b));
    script.extend(life(b, gb));
    script.extend([end(gb), end(b), Step::PowerOff]);
    let mut e = FakeEngine::new(g.clone(), caps, script);
    let cfg = WatchConfig {
        fork: true,
        exec: true,
        exit: true,
        ..WatchConfig::default()
    };
    let mut s = Session::new(&e, Arc::new(g.profile.clone()), g.layout, &cfg).expect("session");
    let run = RunInfo {
        run_id: RUN.into(),
        host: Some("builder".into()),
    };
    s.set_lineage(Lineage::with_clock(
        run.clone(),
        Box::new(|| UNIX_EPOCH + Duration::from_secs(NOW_S)),
    ));
    let out = SharedBuf::default();
    s.attach(Box::new(
        EventWriter::new(Box::new(out.clone()), format).for_run(run),
    ));
    s.arm(&mut e).expect("arm");
    s.run(&mut e, &limits()).expect("run");
    s.finish();

    out.text()
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}

#[test]
fn exec_ids_join_children_to_parents_across_pid_reuse() {
    for caps in [FakeEngine::kvm_like(), FakeEngine::plugin_like()] {
        for p in committed_profiles() {
            let lines = reuse_run(caps, p, Format::Json);
            let v = schema_validator();
            for l in &lines {
                assert!(v.is_valid(l), "{l}");
            }
            let id =
                |tgid: i32, serial: u32| serde_json::Value::from(format!("{RUN}:{tgid}:{serial}"));
            let null = serde_json::Value::Null;
            // (event, pid, exec_id, parent_exec_id, fork's child_exec_id, euid): serials in
            // order of first sight: sh 1, its parent (pid 0) 2, then each fork.
            let want = [
                ("fork", 10, id(10, 1), id(0, 2), id(11, 3), 0),
                ("exec", 11, id(11, 3), id(10, 1), null.clone(), 0),
                ("fork", 11, id(11, 3), id(10, 1), id(12, 4), 0),
                ("exec", 12, id(12, 4), id(11, 3), null.clone(), 1002),
                ("exit", 12, id(12, 4), id(11, 3), null.clone(), 1002),
                ("exit", 11, id(11, 3), id(10, 1), null.clone(), 0),
                ("fork", 10, id(10, 1), id(0, 2), id(11, 5), 0),
                ("exec", 11, id(11, 5), id(10, 1), null.clone(), 0),
                ("fork", 11, id(11, 5), id(10, 1), id(12, 6), 0),
                ("exec", 12, id(12, 6), id(11, 5), null.clone(), 7),
                ("exit", 12, id(12, 6), id(11, 5), null.clone(), 7),
                ("exit", 11, id(11, 5), id(10, 1), null, 0),
            ];
            let got: Vec<_> = lines
                .iter()
                .map(|l| {
                    (
                        l["event"].as_str().expect("kind"),
                        l["pid"].as_i64().expect("pid"),
                        l["exec_id"].clone(),
                        l["parent_exec_id"].clone(),
                        l.get("child_exec_id").cloned().unwrap_or_default(),
                        l["euid"].as_u64().expect("euid"),
                    )
                })
                .collect();
            assert_eq!(got, want);
            // Wall-clock times: the clock at the first event, then the engine's spacing.
            let t0 = lines[0]["time_ns"].as_u64().expect("ns");
            for l in &lines {
                let dt = l["time_ns"].as_u64().expect("ns") - t0;
                let want = crate::lineage::rfc3339(NOW_S * 1_000_000_000 + dt);
                assert_eq!(l["time"], serde_json::Value::from(want));
            }
            // Real and effective ids of each grandchild, as its cred holds them.
            let creds = |l: &serde_json::Value| {
                ["uid", "gid", "euid", "egid"].map(|k| l[k].as_u64().expect("id"))
            };
            assert_eq!(creds(&lines[3]), [1000, 1001, 1002, 1003]);
            assert_eq!(creds(&lines[9]), [5, 6, 7, 8]);
        }
    }
}

#[test]
fn ecs_documents_follow_ecs_and_join_entity_ids_across_pid_reuse() {
    let flat = ornament_test_gate::require!(
        "ECS's field definitions (npm and node, or a cached ecs_flat.json)",
        ornament_tests::ecs::ecs_flat()
    );
    for p in committed_profiles() {
        let docs = reuse_run(FakeEngine::plugin_like(), p.clone(), Format::Ecs);
        for d in &docs {
            ornament_tests::ecs::check_ecs(d, &flat);
        }
        // Each document names the process of its JSON event (a fork's: the new one), so
        // a child's entity_id is the same from its fork to its exit.
        let json = reuse_run(FakeEngine::plugin_like(), p.clone(), Format::Json);
        let want: Vec<_> = json
            .iter()
            .map(|l| match l["event"].as_str() {
                Some("fork") => (
                    &l["event"],
                    &l["child_tgid"],
                    &l["child_exec_id"],
                    &l["exec_id"],
                ),
                _ => (&l["event"], &l["tgid"], &l["exec_id"], &l["parent_exec_id"]),
            })
            .collect();
        let got: Vec<_> = docs
            .iter()
            .map(|d| {
                let p = &d["process"];
                (
                    &d["event"]["action"],
                    &p["pid"],
                    &p["entity_id"],
                    &p["parent"]["entity_id"],
                )
            })
            .collect();
        assert_eq!(got, want);
        assert_eq!(docs.len(), 12);
        assert_eq!(docs[3]["process"]["user"]["id"], "1002");
        assert_eq!(docs[9]["process"]["real_group"]["id"], "6");
    }
}
