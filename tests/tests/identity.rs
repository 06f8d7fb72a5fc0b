//! Events that identify (issue #17) from real guests: the JSON schema's ids across a pid
//! used again, real and effective ids through `su` and a setuid binary, and the ECS
//! documents of the events workload checked against ECS's published definitions.

use ornament_tests::schema::{check_lineage, check_schema};
use ornament_tests::workload::{events, facts, i, json_lines};
use ornament_tests::{assert_nothing_left, ornament};
use serde_json::Value;

/// `--format ecs`: every document of the workload's run is made of ECS fields of ECS's
/// types (its published definitions), and the workload's processes join up by
/// `process.entity_id`: each child's `process.parent.entity_id` is its parent's.
#[test]
fn ecs_documents_of_the_workload_follow_ecs() {
    ornament_tests::require_qemu_guest!();
    let flat = ornament_tests::gate::require!(
        "ECS's field definitions (npm and node, or a cached ecs_flat.json)",
        ornament_tests::ecs::ecs_flat()
    );
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("events.ecs.json");
    let (r, rt) = ornament(&[
        "run",
        "--image",
        "debian-6.1-cloud",
        "--watch",
        "fork,exec,exit,syscall=getpriority",
        "--format",
        "ecs",
        "--output",
        out.to_str().expect("utf8"),
        "--",
        "/ornament/bin/ornament-workload",
        "all",
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_nothing_left(&r, rt.path());
    let docs = events(&out);
    let f = facts(&r.stderr);
    let mut entity_of = std::collections::BTreeMap::new();
    for d in &docs {
        ornament_tests::ecs::check_ecs(d, &flat);
        let p = &d["process"];
        if d["event"]["action"] == "exec" {
            entity_of.insert(i(p, "pid"), p["entity_id"].clone());
        }
    }
    let mut joined = 0;
    for (parent, child) in &f.forks {
        let (Some(pe), Some(ce)) = (entity_of.get(parent), entity_of.get(child)) else {
            continue;
        };
        for d in docs.iter().filter(|d| d["process"]["entity_id"] == *ce) {
            assert_eq!(d["process"]["parent"]["entity_id"], *pe, "{d}");
            joined += 1;
        }
    }
    assert!(joined > 0, "no child joined to its parent");
    let exits = docs
        .iter()
        .filter(|d| d["event"]["action"] == "exit")
        .count();
    assert!(exits >= f.exits.len(), "{exits} exits for {:?}", f.exits);
}

/// A pid used again within a run (the guest's `ns_last_pid` set back): the two processes
/// with the same pid have different `exec_id`s, each the `child_exec_id` of its own fork,
/// and both name the shell's `exec_id` as their parent's.
#[test]
fn exec_ids_change_when_a_pid_is_reused() {
    ornament_tests::require_qemu_guest!();
    let script = "for i in 1 2 3 4 5; do \
        /bin/true & p=$!; wait $p; \
        echo $((p - 1)) > /proc/sys/kernel/ns_last_pid; \
        /bin/true & q=$!; wait $q; \
        [ $p = $q ] && break; \
        done; echo \"W reuse first=$p second=$q\" >&2";
    let (r, rt) = ornament_tests::run_in_guest(
        &["--watch", "fork,exec,exit", "--format", "json"],
        &["sh", "-c", script],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_nothing_left(&r, rt.path());
    let line = r
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("W reuse "))
        .expect("the reuse line");
    let pids: Vec<i64> = line
        .split_whitespace()
        .filter_map(|w| w.split_once('=').and_then(|(_, v)| v.parse().ok()))
        .collect();
    assert!(
        pids.len() == 2 && pids[0] == pids[1],
        "no pid reused: {line}"
    );
    let evs = json_lines(&r.stdout);
    check_schema(&evs);
    check_lineage(&evs);
    let sh = evs
        .iter()
        .rfind(|e| e["event"] == "exec" && e["argv"][0] == "sh")
        .expect("exec of sh");
    let execs: Vec<&Value> = evs
        .iter()
        .filter(|e| e["event"] == "exec" && e["tgid"] == pids[0])
        .collect();
    assert!(execs.len() >= 2, "{execs:?}");
    let last_two = &execs[execs.len() - 2..];
    assert_ne!(last_two[0]["exec_id"], last_two[1]["exec_id"]);
    for x in last_two {
        assert_eq!(x["parent_exec_id"], sh["exec_id"], "{x}");
        assert!(
            evs.iter().any(|f| f["event"] == "fork"
                && f["child_exec_id"] == x["exec_id"]
                && f["exec_id"] == sh["exec_id"]),
            "no fork by sh gave {x}"
        );
    }
}

/// Real and effective ids, read at the hit by the plugin and from memory under the
/// gdbstub alike: `su` to uid 1000 / gid 1001 (its setid events carry the new ids), then a
/// setuid-root copy of busybox run by that user (uid 1000, euid 0) from exec to exit.
#[test]
fn real_and_effective_ids_through_su_and_a_setuid_binary() {
    ornament_tests::require_qemu_guest!();
    let script = "echo 'idtest:x:1000:1001::/tmp:/bin/sh' >> /etc/passwd; \
        echo 'idtest:x:1001:' >> /etc/group; \
        cp /bin/busybox /tmp/suidbb && chmod 4755 /tmp/suidbb; \
        su -s /bin/sh idtest -c '/tmp/suidbb true; exit 4'";
    let ids = |e: &Value| ["uid", "gid", "euid", "egid"].map(|k| i(e, k));
    for trap in ["plugin", "gdbstub"] {
        let (r, rt) = ornament_tests::run_in_guest(
            &[
                "--trap",
                trap,
                "--watch",
                "fork,exec,exit,setid",
                "--format",
                "json",
            ],
            &["sh", "-c", script],
        );
        assert_eq!(r.code, Some(4), "{trap}: {}", r.stderr);
        assert_nothing_left(&r, rt.path());
        let evs = json_lines(&r.stdout);
        check_schema(&evs);
        // The first event of `kind` whose argv (exec) or comm (others) starts with `what`.
        let find = |kind: &str, what: &str| {
            evs.iter()
                .find(|e| {
                    let text = match kind {
                        "exec" => e["argv"].as_array().map(|a| {
                            a.iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join(" ")
                        }),
                        _ => e["comm"].as_str().map(str::to_owned),
                    };
                    e["event"] == kind && text.is_some_and(|t| t.starts_with(what))
                })
                .unwrap_or_else(|| panic!("{trap}: no {kind} of {what}"))
        };
        let su_uid = evs
            .iter()
            .find(|e| e["event"] == "setid" && e["changed"] == "uid" && e["comm"] == "su")
            .expect("su's setuid");
        let got = [
            ids(su_uid),
            ids(find("exec", "sh -c /tmp/suidbb")),
            ids(find("exec", "/tmp/suidbb")),
            ids(find("exit", "suidbb")),
        ];
        let user = [1000, 1001, 1000, 1001];
        let setuid_root = [1000, 1001, 0, 1001];
        assert_eq!(got, [user, user, setuid_root, setuid_root], "{trap}");
    }
}
