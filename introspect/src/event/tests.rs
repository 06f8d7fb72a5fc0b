//! Tests of the event types: JSON round trips, the documented schema, the text form.

use super::*;
/// The run of [`samples`].
pub(crate) const RUN_ID: &str = "0b5a3f4e-1c2d-4e5f-8a9b-0c1d2e3f4a5b";

fn header() -> TaskHeader {
    TaskHeader {
        time: Some("2026-12-03T07:30:01.500000000Z".into()),
        time_ns: 1_500_000_000,
        vcpu: 1,
        pid: Some(42),
        tgid: Some(42),
        ppid: Some(1),
        comm: Some("sh".into()),
        uid: Some(0),
        gid: Some(0),
        euid: Some(0),
        egid: Some(0),
        exec_id: Some(format!("{RUN_ID}:42:2")),
        parent_exec_id: Some(format!("{RUN_ID}:1:1")),
    }
}

/// An output that tests read back: what was written, shared with the writer.
#[derive(Debug, Clone, Default)]
pub(crate) struct SharedBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl SharedBuf {
    /// What was written, as text.
    pub(crate) fn text(&self) -> String {
        String::from_utf8(self.0.lock().expect("buf").clone()).expect("utf8")
    }
}

impl std::io::Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("buf").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A validator of [`JSON_SCHEMA`] that checks formats too (`date-time`).
pub(crate) fn schema_validator() -> jsonschema::Validator {
    let schema: serde_json::Value = serde_json::from_str(JSON_SCHEMA).expect("schema is JSON");
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("a valid schema")
}

/// One event of each kind, as the monitor and lineage make them.
pub(crate) fn samples() -> Vec<Event> {
    vec![
        Event::Fork(ForkEvent {
            task: header(),
            child_pid: Some(43),
            child_tgid: Some(43),
            thread: false,
            kernel_thread: false,
            child_exec_id: Some(format!("{RUN_ID}:43:3")),
        }),
        Event::Exec(ExecEvent {
            task: header(),
            filename: Some("/bin/ls".into()),
            argv: vec!["ls".into(), "-l".into()],
            argv_truncated: false,
            cwd: Some("/home/u".into()),
        }),
        Event::Exit(ExitEvent {
            task: header(),
            exit_code: 3,
            signal: None,
            core_dumped: false,
            group_exit: true,
        }),
        Event::Syscall(SyscallEvent {
            task: header(),
            nr: 258,
            name: Some("mkdirat".into()),
            args: [0xffff_ff9c, 0x1000, 0o755, 0, 0, 0],
            path: Some("/tmp/x".into()),
            denied: None,
            reported: true,
        }),
        Event::Setid(SetidEvent {
            task: TaskHeader {
                euid: Some(1000),
                ..header()
            },
            changed: IdChange::Uid,
        }),
        Event::SyscallReturn(SyscallReturnEvent {
            task: header(),
            nr: 258,
            name: Some("mkdirat".into()),
            ret: Some(-17),
            errno: Some("EEXIST".into()),
            entry_time_ns: Some(1_400_000_000),
        }),
        Event::ExecFailed(ExecFailedEvent {
            task: header(),
            syscall: "execve".into(),
            filename: Some("/no/such".into()),
            errno: 2,
            errno_name: "ENOENT".into(),
        }),
        Event::Signal(SignalEvent {
            task: header(),
            signal: 15,
            signal_name: signal_name(15),
            code: Some(0),
            origin: SignalOrigin::Task,
            target_pid: Some(44),
            target_tgid: Some(43),
            target_comm: Some("sleep".into()),
            scope: Some(SignalScope::Process),
            addr: None,
            sender_pid: Some(42),
        }),
        Event::SignalDeliver(SignalDeliverEvent {
            task: header(),
            signal: 11,
            signal_name: signal_name(11),
            action: SignalAction::Kill,
        }),
    ]
}

#[test]
fn new_kinds_text_and_names() {
    let s = samples();
    let text: Vec<String> = s[5..].iter().map(Event::to_text).collect();
    let h = "1.500000000 cpu1 sh[42] ppid=1 uid=0";
    assert_eq!(
        text,
        [
            format!("{h} syscall_return mkdirat = -17 EEXIST"),
            format!("{h} exec_failed \"/no/such\" execve ENOENT"),
            format!("{h} signal SIGTERM to=sleep[43/44] code=0 from-task"),
            format!("{h} signal_deliver SIGSEGV kill"),
        ]
    );
    assert_eq!(
        [
            signal_name(9),
            signal_name(34),
            signal_name(64),
            signal_name(65)
        ],
        ["SIGKILL", "SIGRTMIN+2", "SIGRTMIN+32", "SIG65"]
    );
    assert_eq!(
        (errno_text(2), errno_text(4000)),
        ("ENOENT".into(), "E4000".into())
    );
}

#[test]
fn json_schema_round_trips_and_names_every_field() {
    let events = samples();
    for e in &events {
        let line = e.to_json();
        assert!(!line.contains('\n'));
        assert_eq!(&Event::from_json(&line).expect("parse"), e, "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        for k in [
            "event",
            "time",
            "time_ns",
            "vcpu",
            "pid",
            "tgid",
            "ppid",
            "comm",
            "uid",
            "gid",
            "euid",
            "egid",
            "exec_id",
            "parent_exec_id",
        ] {
            assert!(v.get(k).is_some(), "{k} in {line}");
            assert!(SCHEMA_DOC.contains(&format!("`{k}`")), "{k} documented");
        }
        for k in v.as_object().expect("object").keys() {
            assert!(SCHEMA_DOC.contains(&format!("`{k}`")), "{k} documented");
        }
    }
    assert_eq!(
        events[2].to_json(),
        format!(
            r#"{{"event":"exit","time":"2026-12-03T07:30:01.500000000Z","time_ns":1500000000,"vcpu":1,"pid":42,"tgid":42,"ppid":1,"comm":"sh","uid":0,"gid":0,"euid":0,"egid":0,"exec_id":"{RUN_ID}:42:2","parent_exec_id":"{RUN_ID}:1:1","exit_code":3,"signal":null,"core_dumped":false,"group_exit":true}}"#
        )
    );
    assert_eq!(
        events[3].to_text(),
        "1.500000000 cpu1 sh[42] ppid=1 uid=0 syscall mkdirat(0xffffff9c, 0x1000, 0x1ed, 0x0, 0x0, 0x0) path=\"/tmp/x\""
    );
    assert_eq!(
        events[1].to_text(),
        "1.500000000 cpu1 sh[42] ppid=1 uid=0 exec \"/bin/ls\" argv=[\"ls\",\"-l\"] cwd=\"/home/u\""
    );
    assert!(Event::from_json("{\"event\":\"nope\"}").is_err());
}

#[test]
fn guest_strings_cannot_forge_a_line_or_reach_the_terminal() {
    let mut h = header();
    h.comm = Some("a\n9.999 cpu0 ss".into());
    let ev = Event::Exec(ExecEvent {
        task: h,
        filename: Some("/tmp/a\n9.999 cpu0 ss[1] exit\u{1b}[2J\u{9b}1m\\".into()),
        argv: vec!["x\"y\r".into()],
        argv_truncated: false,
        cwd: None,
    });
    let text = ev.to_text();
    assert!(!text.contains(['\n', '\r', '\u{1b}', '\u{9b}']), "{text}");
    assert_eq!(
        text,
        r#"1.500000000 cpu1 "a\n9.999 cpu0 ss"[42] ppid=1 uid=0 exec "/tmp/a\n9.999 cpu0 ss[1] exit\u{1b}[2J\u{9b}1m\\" argv=["x\"y\r"]"#
    );
    // Bytes that are not UTF-8 show as themselves, and a backslash as itself.
    let mut h = header();
    h.comm = Some(crate::guest_text::decode(b"x\xff\\x41"));
    assert!(h.to_string().contains(r#" "x\xff\\x41"[42]"#), "{h}");
    // A plain comm stays bare; an odd one is quoted so it cannot pose as fields.
    let mut h = header();
    h.comm = Some("kworker/0:1".into());
    assert!(h.to_string().contains(" kworker/0:1[42]"));
    h.comm = Some("x] ppid=9".into());
    assert!(h.to_string().contains(r#" "x] ppid=9"[42]"#), "{h}");
}

#[test]
fn masks() {
    let m = EventMask::FORK | EventMask::EXIT;
    assert!(m.contains(EventKind::Fork) && !m.contains(EventKind::Exec));
    assert_eq!(EventMask::of(EventKind::ALL), EventMask::ALL);
    assert_eq!(path_arg("openat"), Some(1));
    assert_eq!(path_arg("open"), Some(0));
    assert_eq!(path_arg("read"), None);
}
