//! The registry and the built-in ornaments on hand-made events.

use super::*;
use crate::event::TaskHeader;
use std::collections::BTreeMap;
use std::io::Write;

type Log = Arc<Mutex<Vec<String>>>;

fn log() -> Log {
    Arc::new(Mutex::new(Vec::new()))
}

fn lines(l: &Log) -> Vec<String> {
    l.lock().expect("log").clone()
}

fn hdr(pid: i32, tgid: i32) -> TaskHeader {
    TaskHeader {
        pid: Some(pid),
        tgid: Some(tgid),
        ppid: Some(1),
        comm: Some("t".into()),
        uid: Some(0),
        ..TaskHeader::default()
    }
}

fn syscall(pid: i32, nr: u32) -> Event {
    Event::Syscall(SyscallEvent {
        task: hdr(pid, pid),
        nr,
        name: Some(format!("sys{nr}")),
        ..SyscallEvent::default()
    })
}

fn fork(parent: i32, child: i32) -> Event {
    Event::Fork(ForkEvent {
        task: hdr(parent, parent),
        child_pid: Some(child),
        child_tgid: Some(child),
        ..ForkEvent::default()
    })
}

fn exec(pid: i32) -> Event {
    Event::Exec(ExecEvent {
        task: hdr(pid, pid),
        argv: vec![format!("prog{pid}")],
        ..ExecEvent::default()
    })
}

fn exit(pid: i32, code: u8) -> Event {
    Event::Exit(ExitEvent {
        task: hdr(pid, pid),
        exit_code: code,
        group_exit: true,
        ..ExitEvent::default()
    })
}

/// Logs each event and what it saw decided, then acts.
struct Probe {
    name: String,
    log: Log,
    act: fn(&mut Decision),
}

impl Probe {
    fn boxed(name: &str, log: &Log, act: fn(&mut Decision)) -> Box<dyn Ornament> {
        Box::new(Self {
            name: name.into(),
            log: Arc::clone(log),
            act,
        })
    }
    fn note(&mut self, what: String, d: &mut Decision) {
        self.log
            .lock()
            .expect("log")
            .push(format!("{} {what} saw {:?}", self.name, d.action()));
        (self.act)(d);
    }
}

impl Ornament for Probe {
    fn name(&self) -> &str {
        &self.name
    }
    fn on_syscall(&mut self, ev: &SyscallEvent, d: &mut Decision) {
        self.note(format!("syscall {}", ev.nr), d);
    }
    fn on_exec(&mut self, ev: &ExecEvent, d: &mut Decision) {
        self.note(format!("exec {:?}", ev.task.pid), d);
    }
}

#[test]
fn order_and_later_sees_earlier() {
    let l = log();
    let mut r = Registry::new();
    r.attach(Probe::boxed("a", &l, |d| {
        assert!(d.deny(1));
    }));
    r.attach(Probe::boxed("b", &l, |d| d.pause()));
    r.attach(Probe::boxed("c", &l, |d| {
        assert!(d.deny(13));
    }));
    let d = r.dispatch(&syscall(5, 83));
    assert_eq!(
        lines(&l),
        [
            "a syscall 83 saw Continue",
            "b syscall 83 saw DenySyscall { errno: 1 }",
            "c syscall 83 saw DenySyscall { errno: 1 }",
        ]
    );
    assert_eq!(d.action(), Action::DenySyscall { errno: 13 });
    assert!(d.pause_requested());
    assert_eq!(d.decided_by(), Some("c"));
    assert_eq!(r.names(), ["a", "b", "c"]);
    // Deny is refused outside syscall entry and for bad errno values.
    let d = r.dispatch(&exec(5));
    assert_eq!(d.action(), Action::PauseGuest);
    assert_eq!(d.ignored(), 0);
    let mut d = Decision::new(false);
    assert!(!d.deny(1));
    let mut s = Decision::new(true);
    assert!(!s.deny(0) && !s.deny(4096) && s.deny(4095));
    s.allow();
    assert_eq!(s.action(), Action::Continue);
    assert_eq!((d.ignored(), s.ignored()), (1, 2));
}

/// Detaches itself and attaches a fresh copy of itself on every event.
struct Rejoin {
    log: Log,
    me: Arc<Mutex<Option<OrnamentHandle>>>,
}

impl Ornament for Rejoin {
    fn name(&self) -> &str {
        "rejoin"
    }
    fn on_syscall(&mut self, ev: &SyscallEvent, d: &mut Decision) {
        self.log
            .lock()
            .expect("log")
            .push(format!("rejoin syscall {}", ev.nr));
        if let Some(me) = *self.me.lock().expect("me") {
            d.detach(me);
        }
        let me = Arc::new(Mutex::new(None));
        let h = d.attach(Box::new(Rejoin {
            log: Arc::clone(&self.log),
            me: Arc::clone(&me),
        }));
        *me.lock().expect("me") = Some(h);
    }
}

#[test]
fn attach_and_detach_during_delivery_never_loop_or_skip() {
    let l = log();
    let mut r = Registry::new();
    let first = r.attach(Probe::boxed("a", &l, |_| {}));
    let me = Arc::new(Mutex::new(None));
    let h = r.attach(Box::new(Rejoin {
        log: Arc::clone(&l),
        me: Arc::clone(&me),
    }));
    *me.lock().expect("me") = Some(h);
    r.attach(Probe::boxed("b", &l, |_| {}));
    for nr in 0..3 {
        l.lock().expect("log").clear();
        let _ = r.dispatch(&syscall(1, nr));
        // Everyone attached at the start gets the event exactly once.
        let mut got = lines(&l);
        got.sort();
        assert_eq!(
            got,
            [
                format!("a syscall {nr} saw Continue"),
                format!("b syscall {nr} saw Continue"),
                format!("rejoin syscall {nr}"),
            ]
        );
        // The fresh copy replaced the old one, at the end.
        assert_eq!(r.names(), ["a", "b", "rejoin"]);
    }
    assert!(!r.handles().contains(&h));
    assert!(r.detach(first).is_ok());
    assert_eq!(
        r.detach(first).err(),
        Some(OrnamentError::NotAttached(first))
    );
}

#[test]
fn detach_of_a_later_ornament_mid_delivery_does_not_skip_it() {
    struct Killer(OrnamentHandle);
    impl Ornament for Killer {
        fn name(&self) -> &str {
            "killer"
        }
        fn on_exec(&mut self, _: &ExecEvent, d: &mut Decision) {
            d.detach(self.0);
        }
    }
    let l = log();
    let mut r = Registry::new();
    let q = r.queue();
    // The killer's target is attached after it, by handle known in advance.
    let target = q.attach(Probe::boxed("target", &l, |_| {}));
    r.attach(Box::new(Killer(target)));
    // The queue is applied at the next dispatch: target first, then killer.
    assert_eq!(r.names(), ["killer"]);
    let _ = r.dispatch(&exec(3));
    assert_eq!(lines(&l), ["target exec Some(3) saw Continue"]);
    assert_eq!(r.names(), ["killer"]);
    let _ = r.dispatch(&exec(4));
    assert_eq!(lines(&l).len(), 1);
}

#[test]
fn panics_are_contained_and_repeat_offenders_detached() {
    struct Bomb;
    impl Ornament for Bomb {
        fn name(&self) -> &str {
            "bomb"
        }
        fn on_syscall(&mut self, _: &SyscallEvent, d: &mut Decision) {
            d.pause();
            d.detach(OrnamentHandle(0));
            panic!("boom");
        }
    }
    let l = log();
    let mut r = Registry::new();
    let a = r.attach(Probe::boxed("a", &l, |d| {
        d.deny(1);
    }));
    r.attach(Box::new(Bomb));
    r.attach(Probe::boxed("c", &l, |_| {}));
    for i in 0..3 {
        let d = r.dispatch(&syscall(1, i));
        // The bomb's pause and detach were rolled back; c still ran.
        assert_eq!(d.action(), Action::DenySyscall { errno: 1 });
        assert!(!d.pause_requested());
        assert_eq!(r.panics(), u64::from(i) + 1);
    }
    assert!(r.handles().contains(&a));
    assert_eq!(r.names(), ["a", "c"]);
    assert_eq!(lines(&l).len(), 6);
}

#[test]
fn follow_children() {
    let l = log();
    struct Rec(Log);
    impl Ornament for Rec {
        fn name(&self) -> &str {
            "rec"
        }
        fn mask(&self) -> EventMask {
            EventMask::EXEC | EventMask::SYSCALL
        }
        fn on_exec(&mut self, ev: &ExecEvent, _: &mut Decision) {
            self.0
                .lock()
                .expect("log")
                .push(format!("exec {:?}", ev.task.pid));
        }
        fn on_syscall(&mut self, ev: &SyscallEvent, _: &mut Decision) {
            self.0
                .lock()
                .expect("log")
                .push(format!("syscall {:?}", ev.task.pid));
        }
    }
    let mut r = Registry::new();
    r.attach(Box::new(Follow::new(10, Box::new(Rec(Arc::clone(&l))))));
    for ev in [
        fork(10, 11),
        fork(11, 12),
        fork(20, 21),
        exec(12),
        exec(21),
        syscall(11, 0),
        exit(11, 0),
        syscall(11, 1), // pid 11 is gone (and maybe reused by another process)
        exec(10),
        // A thread of the root that predates following (tid 13, tgid 10).
        Event::Syscall(SyscallEvent {
            task: hdr(13, 10),
            ..SyscallEvent::default()
        }),
    ] {
        let _ = r.dispatch(&ev);
    }
    assert_eq!(
        lines(&l),
        [
            "exec Some(12)",
            "syscall Some(11)",
            "exec Some(10)",
            "syscall Some(13)"
        ]
    );
    assert_eq!(r.names(), ["rec (follow 10)"]);
    let m = r.mask();
    assert!(m.contains(EventKind::Fork) && m.contains(EventKind::Exit));
    assert!(!m.contains(EventKind::Setid));
}

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);
impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("buf").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn builtins_deny_write_tree_count() {
    let mut r = Registry::new();
    let (text, json) = (Buf::default(), Buf::default());
    r.attach(Box::new(DenySyscalls::new(BTreeMap::from([(83, 1)]))));
    r.attach(Box::new(EventWriter::new(
        Box::new(text.clone()),
        Format::Text,
    )));
    r.attach(Box::new(
        EventWriter::new(Box::new(json.clone()), Format::Json).with_mask(EventMask::LIFECYCLE),
    ));
    let tree = ProcessTree::new();
    let view = tree.view();
    r.attach(Box::new(tree));
    let counter = Counter::new();
    let counts = counter.counts();
    r.attach(Box::new(counter));
    let mut hidden = SyscallEvent {
        task: hdr(12, 12),
        nr: 83,
        reported: false,
        ..SyscallEvent::default()
    };
    let evs = [
        exec(10),
        fork(10, 11),
        fork(10, 12),
        Event::Fork(ForkEvent {
            task: hdr(11, 11),
            child_pid: Some(14),
            child_tgid: Some(11),
            thread: true,
            kernel_thread: false,
            child_exec_id: None,
        }),
        exec(11),
        syscall(11, 83),
        Event::Syscall(hidden.clone()),
        exit(11, 7),
        Event::Exit(ExitEvent {
            task: hdr(12, 12),
            signal: Some(9),
            group_exit: true,
            ..ExitEvent::default()
        }),
    ];
    let actions: Vec<_> = evs.iter().map(|e| r.dispatch(e).action()).collect();
    assert_eq!(actions[5], Action::DenySyscall { errno: 1 });
    assert_eq!(actions[6], Action::DenySyscall { errno: 1 });
    assert_eq!(actions[4], Action::Continue);
    r.finish();
    let text = String::from_utf8(text.0.lock().expect("t").clone()).expect("utf8");
    assert_eq!(text.lines().count(), 8, "{text}");
    assert!(text.contains("syscall sys83("));
    let json = String::from_utf8(json.0.lock().expect("j").clone()).expect("utf8");
    let kinds: Vec<_> = json
        .lines()
        .map(|l| Event::from_json(l).expect("json").kind())
        .collect();
    assert_eq!(kinds.len(), 7);
    assert!(!kinds.contains(&EventKind::Syscall));
    assert_eq!(
        view.render(),
        "10 t [\"prog10\"] running\n  11 t [\"prog11\"] exit 7 (+1 threads)\n  12 t [\"prog10\"] signal 9\n"
    );
    let c = counts.lock().expect("counts").clone();
    assert_eq!(c.by_kind[&EventKind::Fork], 3);
    assert_eq!(c.by_kind[&EventKind::Syscall], 1);
    assert_eq!(c.by_syscall["sys83"], 1);
    hidden.reported = true;
    assert!(Event::Syscall(hidden).is_reported());
}
