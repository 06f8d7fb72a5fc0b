//! `--otlp URL` (issue #17): a real guest's events exported as OpenTelemetry log records
//! to a receiver that decodes them with OpenTelemetry's own protobuf definitions, checked
//! one by one against the same run's JSON events; a collector that cannot be reached
//! fails the run with the count; bad URLs are refused before anything starts.

use ornament_tests::otlp::Receiver;
use ornament_tests::workload::events;
use ornament_tests::{assert_nothing_left, ornament, run_in_guest};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the epoch.
fn ns(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).expect("after 1970").as_nanos()).expect("u64")
}

/// What identifies one event in both outputs: its kind, its wall-clock time and the
/// process it is about (a fork: the new process).
type Key = (String, u64, String);

fn json_key(e: &Value) -> Key {
    let kind = e["event"].as_str().expect("event kind").to_owned();
    let time = humantime::parse_rfc3339(e["time"].as_str().expect("time")).expect("RFC 3339");
    let who = if kind == "fork" && e["thread"] != true {
        &e["child_exec_id"]
    } else {
        &e["exec_id"]
    };
    (kind, ns(time), who.as_str().expect("exec id").to_owned())
}

fn record_key(r: &Value) -> Key {
    let name = r["event_name"].as_str().expect("event_name");
    let kind = name
        .strip_prefix("ornament.")
        .expect("ornament's event name");
    let time = r["time_unix_nano"].as_u64().expect("time_unix_nano");
    let who = r["attributes"]["process.entity_id"]
        .as_str()
        .expect("process.entity_id");
    (kind.to_owned(), time, who.to_owned())
}

/// Every event of a run reaches the receiver exactly once, through a collector that
/// refuses the first request (the exporter retries), with its wall-clock time inside
/// the run, ECS attributes that say what the JSON event says, and the run's identity as
/// the resource.
#[test]
fn every_event_reaches_the_collector_once_with_its_attributes() {
    ornament_tests::require_qemu_guest!();
    let dir = tempfile::tempdir().expect("tmp");
    let receiver = ornament_tests::gate::require!(
        "an OTLP receiver (python3 with venv and pip; PyPI's opentelemetry-proto)",
        Receiver::start(&dir.path().join("records.jsonl"), 1)
    );
    let json = dir.path().join("events.json");
    let url = receiver.url();
    let before = ns(SystemTime::now());
    let (r, rt) = run_in_guest(
        &[
            "--watch",
            "fork,exec,exit",
            "--format",
            "json",
            "--output",
            json.to_str().expect("utf8"),
            "--otlp",
            &url,
        ],
        &["sh", "-c", "ls / >/dev/null; /bin/echo one two; exit 3"],
    );
    let after = ns(SystemTime::now());
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    assert_nothing_left(&r, rt.path());
    let evs = events(&json);
    let recs = receiver.records();
    assert!(
        r.stderr.contains(&format!(
            "; {} events exported to {url}/v1/logs, 0 lost",
            evs.len()
        )),
        "{}",
        r.stderr
    );
    // The first request was refused: what arrived came with a retry.
    assert!(recs.iter().all(|x| x["request"].as_u64() >= Some(2)));

    let mut by_key: BTreeMap<Key, &Value> = BTreeMap::new();
    for x in &recs {
        let k = record_key(x);
        assert!(by_key.insert(k.clone(), x).is_none(), "twice: {k:?}");
    }
    assert_eq!(recs.len(), evs.len(), "records vs events");
    for e in &evs {
        let k = json_key(e);
        let x = by_key
            .get(&k)
            .unwrap_or_else(|| panic!("no record for {k:?}: {e}"));
        let a = &x["attributes"];
        assert!((before..=after).contains(&k.1), "{k:?} outside the run");
        let observed = x["observed_time_unix_nano"].as_u64().expect("observed");
        assert!(
            observed >= k.1,
            "observed {observed} before the hit {k:?} ({} ns)",
            k.1 - observed
        );
        assert_eq!(x["severity_text"], "INFO");
        assert_eq!(x["scope"], "ornament");
        assert_eq!(x["resource"]["service.name"], "ornament");
        assert_eq!(x["resource"]["service.instance.id"], e["run_id"]);
        assert_eq!(x["resource"]["host.name"], e["host"]);
        assert_eq!(a["host.name"], e["host"]);
        assert_eq!(a["event.action"], e["event"]);
        assert!(a.get("__duplicate_keys__").is_none(), "{a}");
        assert_eq!(a["user.id"], Value::from(e["uid"].to_string()));
        match e["event"].as_str() {
            Some("exec") => {
                assert_eq!(a["process.pid"], e["tgid"]);
                assert_eq!(a["process.args"], e["argv"]);
                assert_eq!(a["process.executable"], e["filename"]);
                assert_eq!(a["process.parent.entity_id"], e["parent_exec_id"]);
            }
            Some("exit") => {
                assert_eq!(a["process.pid"], e["tgid"]);
                assert_eq!(a["process.exit_code"], e["exit_code"]);
            }
            Some("fork") if e["thread"] != true => {
                assert_eq!(a["process.pid"], e["child_tgid"]);
                assert_eq!(a["process.parent.entity_id"], e["exec_id"]);
            }
            _ => {}
        }
    }
    // The command's own exec and exit, as the guest ran them.
    let echo = recs
        .iter()
        .find(|x| {
            x["event_name"] == "ornament.exec" && x["attributes"]["process.args"][0] == "/bin/echo"
        })
        .expect("the echo's exec");
    assert_eq!(
        echo["attributes"]["process.args"],
        serde_json::json!(["/bin/echo", "one", "two"])
    );
    assert!(
        recs.iter().any(
            |x| x["event_name"] == "ornament.exit" && x["attributes"]["process.exit_code"] == 3
        ),
        "no exit 3 among {recs:?}"
    );
}

/// A collector nobody listens at: the command still runs to its end, and ornament fails
/// the run saying how many events did not arrive, and why.
#[test]
fn an_unreachable_collector_fails_the_run_with_the_count() {
    ornament_tests::require_qemu_guest!();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        l.local_addr().expect("addr").port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let (r, rt) = run_in_guest(&["--otlp", &url], &["sh", "-c", "exit 0"]);
    assert_eq!(r.code, Some(125), "{}", r.stderr);
    assert_nothing_left(&r, rt.path());
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("did not reach the OTLP collector"))
        .unwrap_or_else(|| panic!("no loss reported: {}", r.stderr));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == "of")
        .expect("N of M events");
    let (lost, emitted) = (words[at - 1], words[at + 1]);
    assert_eq!(lost, emitted, "{line}");
    assert!(lost.parse::<u64>().expect("a count") >= 2, "{line}");
    assert!(line.contains(&format!("{url}/v1/logs: ")), "{line}");
}

/// URLs ornament cannot send to are refused at once, naming the option and the reason.
#[test]
fn bad_otlp_urls_are_refused_before_the_guest_starts() {
    for (url, says) in [
        ("https://collector:4318", "https is not supported"),
        ("collector:4318", "not a URL"),
        ("http://collector:99999", "port \"99999\""),
    ] {
        let (r, rt) = ornament(&["run", "--otlp", url, "--", "true"]);
        assert_eq!(r.code, Some(125), "{url}: {}", r.stderr);
        assert!(
            r.stderr.contains(&format!("--otlp {url}: ")) && r.stderr.contains(says),
            "{url}: {}",
            r.stderr
        );
        assert_nothing_left(&r, rt.path());
    }
}
