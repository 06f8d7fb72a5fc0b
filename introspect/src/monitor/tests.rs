//! Tests of the monitor on synthetic guests: fake hits whose registers point at
//! synthetic tasks, for every event kind and hook.

use super::*;
use crate::event::EventKind;
use crate::event::{ExecFailedEvent, SyscallReturnEvent};
use crate::ornament::{DenySyscalls, Ornament};
use crate::probes::{ForkHook, ReturnHook, SyscallWatch, WatchConfig};
use crate::task::UserRegs;
use crate::testing::{committed_profiles, SynthConfig, SynthGuest, TaskSpec, USER_ARGS};
use ornament_engine::wire::Window;
use ornament_engine::{Gpa, MemError, ProbeId};

/// Guest memory shared between the test and the monitor.
#[derive(Debug)]
struct Mem(Arc<SynthGuest>);

impl PhysMemory for Mem {
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), MemError> {
        self.0.phys.mem.read_phys(gpa, buf)
    }
    fn write_phys(&self, gpa: Gpa, buf: &[u8]) -> Result<(), MemError> {
        self.0.phys.mem.write_phys(gpa, buf)
    }
    fn size(&self) -> u64 {
        self.0.phys.mem.size()
    }
}

struct World {
    g: Arc<SynthGuest>,
    parent: Gva,
    child: Gva,
    thread: Gva,
    kthread: Gva,
}

const VCPU: u32 = 1;

fn world(profile: Profile) -> World {
    let mut g = SynthGuest::new(profile, SynthConfig::default()).expect("guest");
    let parent = g
        .add_task(&TaskSpec::user(10, "sh", "/bin/sh", &["sh"]))
        .expect("parent");
    let mut c = TaskSpec::user(
        11,
        "mkdir",
        "/usr/bin/mkdir",
        &["mkdir", "/tmp/newdir", "-p"],
    );
    c.parent = Some(parent);
    c.creds = [1000, 1001, 1002, 1003];
    c.cwd = Some("/home/u".into());
    let child = g.add_task(&c).expect("child");
    let mut t = TaskSpec::user(12, "sh", "/bin/sh", &["sh"]);
    t.tgid = 10;
    let thread = g.add_task(&t).expect("thread");
    let kthread = g
        .add_task(&TaskSpec::kthread(13, "kworker/0:1"))
        .expect("kthread");
    g.set_current(VCPU, parent).expect("current");
    World {
        g: Arc::new(g),
        parent,
        child,
        thread,
        kthread,
    }
}

fn everything() -> WatchConfig {
    WatchConfig {
        fork: true,
        exec: true,
        exit: true,
        setid: true,
        syscalls: SyscallWatch::Named(vec!["openat".into(), "mkdirat".into()]),
        deny: vec![("rmdir".into(), 13)],
        hold_syscalls: false,
        may_deny: Vec::new(),
        deny_at_entry: false,
        results: false,
        signals: false,
    }
}

fn monitor(w: &World, cfg: &WatchConfig) -> Monitor {
    let profile = Arc::new(w.g.profile.clone());
    let probes = ProbeSet::new(&profile, w.g.layout, cfg).expect("probes");
    Monitor::new(Arc::new(Mem(Arc::clone(&w.g))), profile, w.g.layout, probes).expect("monitor")
}

fn spec(m: &Monitor, pred: impl Fn(&ArmSpec) -> bool) -> ArmSpec {
    m.probes()
        .specs()
        .iter()
        .find(|s| pred(s))
        .cloned()
        .expect("probe")
}

fn hit(w: &World, s: &ArmSpec, rdi: u64, rsi: u64) -> ProbeHit {
    let mut regs = w.g.regs_kernel(VCPU, s.at);
    regs.rdi = rdi;
    regs.rsi = rsi;
    ProbeHit {
        probe: s.id,
        vcpu: VCPU,
        seq: 1,
        time_ns: 123,
        regs,
        held: s.hold,
        mem: [None; ornament_engine::wire::MAX_MEM_READS],
        bytes: None,
    }
}

/// The one event of a hit, without what [`crate::lineage`] stamped on it (its own tests
/// check that): these tests check what is read from the guest.
fn one(out: HitOutcome) -> Event {
    assert_eq!(out.events.len(), 1, "{out:?}");
    let mut ev = out.events.into_iter().next().expect("event");
    let t = ev.task_mut();
    assert!(t.time.is_some() && t.exec_id.is_some() == t.tgid.is_some());
    (t.time, t.exec_id, t.parent_exec_id) = (None, None, None);
    if let Event::Fork(f) = &mut ev {
        f.child_exec_id = None;
    }
    ev
}

/// A header as the synthetic guest wrote it: creds all `uid` (0), or the child's
/// 1000, 1001, 1002, 1003 (uid, gid, euid, egid).
fn header(pid: i32, tgid: i32, ppid: i32, comm: &str, uid: u32) -> TaskHeader {
    let step = u32::from(uid != 0);
    TaskHeader {
        time_ns: 123,
        vcpu: VCPU,
        pid: Some(pid),
        tgid: Some(tgid),
        ppid: Some(ppid),
        comm: Some(comm.into()),
        uid: Some(uid),
        gid: Some(uid + step),
        euid: Some(uid + 2 * step),
        egid: Some(uid + 3 * step),
        ..TaskHeader::default()
    }
}

fn each_world(f: impl Fn(&World)) {
    for p in committed_profiles() {
        f(&world(p));
    }
}

#[test]
fn fork_events() {
    each_world(|w| {
        let mut m = monitor(w, &everything());
        let s = spec(&m, |s| matches!(s.kind, ProbeKind::Fork(_)));
        assert!(s.hold);
        let ev = one(m.on_hit(&hit(w, &s, w.child.raw(), 0)));
        assert_eq!(
            ev,
            Event::Fork(ForkEvent {
                task: header(10, 10, 0, "sh", 0),
                child_pid: Some(11),
                child_tgid: Some(11),
                thread: false,
                kernel_thread: false,
                child_exec_id: None,
            })
        );
        let Event::Fork(t) = one(m.on_hit(&hit(w, &s, w.thread.raw(), 0))) else {
            panic!("fork");
        };
        assert!(t.thread && !t.kernel_thread);
        assert_eq!((t.child_pid, t.child_tgid), (Some(12), Some(10)));
        let Event::Fork(k) = one(m.on_hit(&hit(w, &s, w.kthread.raw(), 0))) else {
            panic!("fork");
        };
        assert!(k.kernel_thread && !k.thread);
        // A child pointer that is not a kernel address: the event keeps the parent.
        let Event::Fork(bad) = one(m.on_hit(&hit(w, &s, 0x1234, 0))) else {
            panic!("fork");
        };
        assert_eq!((bad.child_pid, bad.task.pid), (None, Some(10)));
    });
}

#[test]
fn exec_events_from_the_connector_and_the_fallback() {
    each_world(|w| {
        let mut m = monitor(w, &everything());
        let s = spec(&m, |s| matches!(s.kind, ProbeKind::Exec(_)));
        assert_eq!(s.symbol, "proc_exec_connector");
        w.g.set_current(VCPU, w.child).expect("current");
        let ev = one(m.on_hit(&hit(w, &s, w.child.raw(), 0)));
        assert_eq!(
            ev,
            Event::Exec(ExecEvent {
                task: header(11, 11, 10, "mkdir", 1000),
                filename: Some("/usr/bin/mkdir".into()),
                argv: vec!["mkdir".into(), "/tmp/newdir".into(), "-p".into()],
                argv_truncated: false,
                cwd: Some("/home/u".into()),
            })
        );

        // begin_new_exec(bprm): filename and argv from the binprm.
        let mut p = w.g.profile.clone();
        p.symbols.remove("proc_exec_connector");
        let probes = ProbeSet::new(&p, w.g.layout, &everything()).expect("probes");
        let mut m = Monitor::new(
            Arc::new(Mem(Arc::clone(&w.g))),
            Arc::new(p),
            w.g.layout,
            probes,
        )
        .expect("monitor");
        let s = spec(&m, |s| matches!(s.kind, ProbeKind::Exec(_)));
        assert_eq!(s.kind, ProbeKind::Exec(ExecHook::BeginNewExec));
        // A SynthGuest is shared read-only here: build the binprm in a fresh guest.
        let mut g2 = world(w.g.profile.clone());
        let g = Arc::get_mut(&mut g2.g).expect("unique");
        let bprm = g.alloc(512).expect("bprm");
        let name = g.alloc_str("/usr/bin/a-very-long-program-name").expect("s");
        let off = |m| g.off("linux_binprm", m).expect("bprm field");
        let mm = g
            .read_u64(
                g2.child
                    .wrapping_add(g.off("task_struct", "mm").expect("mm")),
            )
            .expect("mm");
        g.write_u64(bprm.wrapping_add(off("filename")), name.raw())
            .expect("w");
        g.write_u32(bprm.wrapping_add(off("argc")), 2).expect("w");
        g.write_u64(bprm.wrapping_add(off("p")), USER_ARGS)
            .expect("w");
        g.write_u64(bprm.wrapping_add(off("mm")), mm).expect("w");
        let mut m2 = Monitor::new(
            Arc::new(Mem(Arc::clone(&g2.g))),
            Arc::new(m.profile.as_ref().clone()),
            g2.g.layout,
            m.probes().clone(),
        )
        .expect("monitor");
        let Event::Exec(e) = one(m2.on_hit(&hit(&g2, &s, bprm.raw(), 0))) else {
            panic!("exec");
        };
        assert_eq!(
            e.filename.as_deref(),
            Some("/usr/bin/a-very-long-program-name")
        );
        assert_eq!(e.task.comm.as_deref(), Some("a-very-long-pro"));
        assert_eq!(e.task.pid, Some(10));
        assert_eq!(e.argv, ["mkdir", "/tmp/newdir"]);
        assert!(!e.argv_truncated);
        // A hostile binprm pointer: an event with what could be read, no panic.
        let Event::Exec(e) = one(m.on_hit(&hit(w, &s, 0x42, 0))) else {
            panic!("exec");
        };
        assert!(e.filename.is_none() && e.argv_truncated);
    });
}

#[test]
fn exit_events() {
    each_world(|w| {
        let mut m = monitor(w, &everything());
        let s = spec(&m, |s| matches!(s.kind, ProbeKind::Exit(_)));
        let code_at = |t: Gva| t.wrapping_add(w.g.off("task_struct", "exit_code").expect("f"));
        let cases = [
            (w.child, 7u32 << 8, 7u8, None, false, true),
            (w.child, 9, 0, Some(9u8), false, true),
            (w.child, 0x80 | 11, 0, Some(11), true, true),
            (w.thread, 0, 0, None, false, false),
        ];
        for (task, code, want_code, want_sig, core, group) in cases {
            w.g.write_u32(code_at(task), code).expect("w");
            let Event::Exit(e) = one(m.on_hit(&hit(w, &s, task.raw(), 0))) else {
                panic!("exit");
            };
            assert_eq!(
                (e.exit_code, e.signal, e.core_dumped, e.group_exit),
                (want_code, want_sig, core, group),
                "{code:#x}"
            );
        }
        // do_exit(code) fallback: current is the exiting task.
        let mut p = w.g.profile.clone();
        p.symbols.remove("proc_exit_connector");
        let probes = ProbeSet::new(&p, w.g.layout, &everything()).expect("probes");
        let mut m = Monitor::new(
            Arc::new(Mem(Arc::clone(&w.g))),
            Arc::new(p),
            w.g.layout,
            probes,
        )
        .expect("monitor");
        let s = spec(&m, |s| s.kind == ProbeKind::Exit(ExitHook::DoExit));
        w.g.set_current(VCPU, w.child).expect("current");
        let ev = one(m.on_hit(&hit(w, &s, 0xffff_ffff_0000_0300, 0)));
        assert_eq!(
            ev,
            Event::Exit(ExitEvent {
                task: header(11, 11, 10, "mkdir", 1000),
                exit_code: 3,
                signal: None,
                core_dumped: false,
                group_exit: true,
            })
        );
    });
}

#[test]
fn syscall_events_args_and_paths() {
    each_world(|w| {
        let mut m = monitor(w, &everything());
        let mkdirat = w.g.profile.syscall_nr("mkdirat").expect("nr");
        let s = spec(&m, |s| {
            s.kind == ProbeKind::Syscall(SyscallHook::Function { nr: mkdirat })
        });
        assert!(!s.hold);
        w.g.set_current(VCPU, w.child).expect("current");
        let path_at = USER_ARGS + 6; // "/tmp/newdir" in the child's argv area
        let regs = UserRegs {
            di: 0xffff_ff9c,
            si: path_at,
            dx: 0o755,
            r10: 4,
            r8: 5,
            r9: 6,
            orig_ax: u64::from(mkdirat),
            ..UserRegs::default()
        };
        w.g.write_user_regs(w.child, &regs).expect("pt_regs");
        let k = Kernel::new(&w.g.phys.mem, &w.g.profile, w.g.layout);
        let r = TaskReader::new(&k).expect("reader");
        let pt = r
            .user_regs_addr(&k.kernel_vm(&w.g.regs_kernel(0, Gva(0))), w.child)
            .expect("pt_regs");
        let out = m.on_hit(&hit(w, &s, pt.raw(), 0));
        assert_eq!(out.action, Action::Continue);
        assert_eq!(
            one(out),
            Event::Syscall(SyscallEvent {
                task: header(11, 11, 10, "mkdir", 1000),
                nr: mkdirat,
                name: Some("mkdirat".into()),
                args: [0xffff_ff9c, path_at, 0o755, 4, 5, 6],
                path: Some("/tmp/newdir".into()),
                denied: None,
                reported: true,
            })
        );
        // The same event from the values an engine reads at the hit (arguments and
        // the caller's header), and they stay those of the hit when memory changes.
        let plain = hit(w, &s, pt.raw(), 0);
        let at_hit = with_reads(w, &s, plain.clone());
        assert!(at_hit.mem[crate::probes::MEM_HDR_UID].is_some());
        let from_ram = one(m.on_hit(&plain));
        assert_eq!(one(m.on_hit(&at_hit)), from_ram);
        let comm = w.g.off("task_struct", "comm").expect("comm");
        w.g.write(w.child.wrapping_add(comm), b"renamed\0")
            .expect("w");
        assert_eq!(one(m.on_hit(&at_hit)), from_ram);
        assert_ne!(one(m.on_hit(&plain)), from_ram, "memory did change");
        w.g.write(w.child.wrapping_add(comm), b"mkdir\0")
            .expect("w");
        // An unmapped path pointer: no path, the event still comes.
        let mut bad = regs;
        bad.si = 0x1000;
        w.g.write_user_regs(w.child, &bad).expect("pt_regs");
        let Event::Syscall(e) = one(m.on_hit(&hit(w, &s, pt.raw(), 0))) else {
            panic!("syscall");
        };
        assert_eq!((e.path, e.args[1]), (None, 0x1000));
        // No current task: null header fields, the arguments still read.
        w.g.set_current(VCPU, Gva(0x1234)).expect("current");
        let Event::Syscall(e) = one(m.on_hit(&hit(w, &s, pt.raw(), 0))) else {
            panic!("syscall");
        };
        assert_eq!(e.task.pid, None);
        assert_eq!(e.args[0], 0xffff_ff9c);
        assert_eq!(m.stats().no_current, 1);
        w.g.set_current(VCPU, w.parent).expect("current");
    });
}

#[test]
fn deny_and_filtering_at_do_syscall_64() {
    each_world(|w| {
        let mut m = monitor(w, &everything());
        let rmdir = w.g.profile.syscall_nr("rmdir").expect("nr");
        let rules = m.probes().deny_rules().clone();
        m.registry_mut().attach(Box::new(DenySyscalls::new(rules)));
        let s = spec(&m, |s| s.symbol == "do_syscall_64");
        assert!(s.hold);
        assert_eq!(s.syscall_filter, Some(vec![rmdir]));
        w.g.set_current(VCPU, w.child).expect("current");
        let k = Kernel::new(&w.g.phys.mem, &w.g.profile, w.g.layout);
        let r = TaskReader::new(&k).expect("reader");
        let pt = r
            .user_regs_addr(&k.kernel_vm(&w.g.regs_kernel(0, Gva(0))), w.child)
            .expect("pt_regs");
        let out = m.on_hit(&hit(w, &s, pt.raw(), u64::from(rmdir)));
        // Denied, delivered to the ornaments, but not a reported event.
        assert_eq!(out.action, Action::DenySyscall { errno: 13 });
        assert!(out.events.is_empty());
        assert_eq!(m.registry().delivered(), 1);
        // Other numbers (an engine that cannot filter) and negative ones are dropped.
        for rsi in [0u64, u64::MAX] {
            let out = m.on_hit(&hit(w, &s, pt.raw(), rsi));
            assert_eq!(out, HitOutcome::nothing());
        }
        assert_eq!(m.stats().filtered, 2);
        // A probe id not in the set.
        let mut h = hit(w, &s, 0, 0);
        h.probe = ProbeId(999);
        assert_eq!(m.on_hit(&h), HitOutcome::nothing());
        assert_eq!(m.stats().unknown_probe, 1);
        assert_eq!(m.stats().hits, 4);
        w.g.set_current(VCPU, w.parent).expect("current");

        // All syscalls: every number is an event, with its name.
        let all = WatchConfig {
            syscalls: SyscallWatch::All,
            ..WatchConfig::default()
        };
        let mut m = monitor(w, &all);
        let s = spec(&m, |s| s.symbol == "do_syscall_64");
        let Event::Syscall(e) = one(m.on_hit(&hit(w, &s, pt.raw(), 39))) else {
            panic!("syscall");
        };
        assert_eq!((e.nr, e.name.as_deref()), (39, Some("getpid")));
        assert_eq!(e.path, None);
    });
}

#[test]
fn setid_events() {
    each_world(|w| {
        let mut m = monitor(w, &everything());
        let s = spec(&m, |s| s.kind == ProbeKind::Setid);
        let ev = one(m.on_hit(&hit(w, &s, w.child.raw(), PROC_EVENT_GID)));
        assert_eq!(
            ev,
            Event::Setid(SetidEvent {
                task: header(11, 11, 10, "mkdir", 1000),
                changed: IdChange::Gid,
            })
        );
        let Event::Setid(e) = one(m.on_hit(&hit(w, &s, w.child.raw(), PROC_EVENT_UID))) else {
            panic!("setid");
        };
        assert_eq!(e.changed, IdChange::Uid);
        // Another which_id (PROC_EVENT_SID, ...) is not a setid event.
        assert_eq!(
            m.on_hit(&hit(w, &s, w.child.raw(), 0x80)),
            HitOutcome::nothing()
        );
    });
}

#[test]
fn ornaments_decide_the_action() {
    struct Pauser;
    impl Ornament for Pauser {
        fn name(&self) -> &str {
            "pauser"
        }
        fn on_fork(&mut self, _: &ForkEvent, d: &mut crate::ornament::Decision) {
            d.pause();
        }
    }
    let w = world(committed_profiles().remove(0));
    let mut m = monitor(&w, &everything());
    m.registry_mut().attach(Box::new(Pauser));
    let s = spec(&m, |s| {
        s.kind == ProbeKind::Fork(ForkHook::ProcForkConnector)
    });
    let out = m.on_hit(&hit(&w, &s, w.child.raw(), 0));
    assert_eq!(out.action, Action::PauseGuest);
    assert!(out.pause);
    assert_eq!(out.events[0].kind(), EventKind::Fork);
    m.finish();
}

/// Per-hit cost on a synthetic guest (run with `--release --ignored --nocapture`).
#[test]
#[ignore = "timing; run by hand in release mode"]
fn per_hit_cost() {
    let w = world(committed_profiles().remove(1));
    let mut m = monitor(&w, &everything());
    w.g.set_current(VCPU, w.child).expect("current");
    let k = Kernel::new(&w.g.phys.mem, &w.g.profile, w.g.layout);
    let r = TaskReader::new(&k).expect("reader");
    let pt = r
        .user_regs_addr(&k.kernel_vm(&w.g.regs_kernel(0, Gva(0))), w.child)
        .expect("pt_regs");
    let is_fork: fn(&ArmSpec) -> bool = |s| matches!(s.kind, ProbeKind::Fork(_));
    let is_exec: fn(&ArmSpec) -> bool = |s| matches!(s.kind, ProbeKind::Exec(_));
    let is_exit: fn(&ArmSpec) -> bool = |s| matches!(s.kind, ProbeKind::Exit(_));
    let is_sys: fn(&ArmSpec) -> bool =
        |s| matches!(s.kind, ProbeKind::Syscall(SyscallHook::Function { .. }));
    let cases = [
        ("fork", w.child.raw(), is_fork),
        ("exec", w.child.raw(), is_exec),
        ("exit", w.child.raw(), is_exit),
        ("syscall", pt.raw(), is_sys),
    ];
    for (name, rdi, pred) in cases {
        let s = spec(&m, pred);
        let h = hit(&w, &s, rdi, 0);
        let n = 20_000u32;
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(m.on_hit(&h));
        }
        eprintln!("{name}: {:?} per hit", t.elapsed() / n);
    }
}

#[test]
fn the_monitor_can_move_to_an_engine_thread() {
    fn send<T: Send>() {}
    send::<Monitor>();
    send::<crate::ornament::Registry>();
    send::<crate::ornament::RegistryQueue>();
}

mod hostile {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Junk in the tasks and junk hook arguments never make a hit panic, and every
        /// hit of a lifecycle probe still gives its event.
        #[test]
        fn junk_never_panics(
            junk in proptest::collection::vec(any::<u8>(), 1..1024),
            at in 0u64..0x1800,
            rdi in prop_oneof![any::<u64>(), Just(0xffff_8880_0000_0000u64)],
            rsi in any::<u64>(),
            which in 0usize..8,
        ) {
            let w = world(committed_profiles().remove(0));
            w.g.write(w.child.wrapping_add(at), &junk).expect("w");
            w.g.write(w.parent.wrapping_add(at), &junk).expect("w");
            let mut m = monitor(&w, &everything());
            let specs = m.probes().specs().to_vec();
            let s = &specs[which % specs.len()];
            for arg in [rdi, w.child.raw()] {
                let out = m.on_hit(&hit(&w, s, arg, rsi));
                if matches!(s.kind, ProbeKind::Fork(_) | ProbeKind::Exec(_) | ProbeKind::Exit(_)) {
                    prop_assert_eq!(out.events.len(), 1);
                }
            }
        }
    }
}

mod at_hit;
use at_hit::with_reads;
