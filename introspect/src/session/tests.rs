//! Sessions over the fake engine: probe placement per engine, ordering, deny, pause,
//! control, follow and attach during delivery, with no VM.

use super::*;
use crate::event::{Event, EventKind, EventMask};
use crate::fake_engine::{FakeEngine, Logged, Step};
use crate::kernel::Kernel;
use crate::ornament::{Decision, DenySyscalls, RegistryQueue};
use crate::probes::SyscallWatch;
use crate::task::{TaskReader, UserRegs};
use crate::testing::{committed_profiles, SynthConfig, SynthGuest, TaskSpec, USER_ARGS};
use ornament_engine::Gva;
use std::sync::Mutex;

/// A guest with `sh` (pid 10), its child `mkdir` (11) and a kernel thread (13).
struct World {
    g: Arc<SynthGuest>,
    sh: Gva,
    mkdir: Gva,
    kthread: Gva,
    /// The child's saved user registers (`__x64_sys_*`'s and `do_syscall_64`'s `regs`).
    mkdir_regs: Gva,
}

fn world(profile: Profile) -> World {
    let mut g = SynthGuest::new(profile, SynthConfig::default()).expect("guest");
    let sh = g
        .add_task(&TaskSpec::user(10, "sh", "/bin/sh", &["sh"]))
        .expect("sh");
    let mut c = TaskSpec::user(11, "mkdir", "/usr/bin/mkdir", &["mkdir", "/tmp/newdir"]);
    c.parent = Some(sh);
    let mkdir = g.add_task(&c).expect("mkdir");
    let kthread = g
        .add_task(&TaskSpec::kthread(13, "kworker/0:1"))
        .expect("kthread");
    let regs = UserRegs {
        di: 0xffff_ff9c,
        si: USER_ARGS + 6,
        dx: 0o755,
        ..UserRegs::default()
    };
    g.write_user_regs(mkdir, &regs).expect("pt_regs");
    let k = Kernel::new(&g.phys.mem, &g.profile, g.layout);
    let mkdir_regs = TaskReader::new(&k)
        .expect("reader")
        .user_regs_addr(&k.kernel_vm(&g.regs_kernel(0, Gva(0))), mkdir)
        .expect("pt_regs");
    World {
        g: Arc::new(g),
        sh,
        mkdir,
        kthread,
        mkdir_regs,
    }
}

fn each_world(f: impl Fn(&World)) {
    for p in committed_profiles() {
        f(&world(p));
    }
}

/// An event as a recorder saw it: kind, pid, and the deny decided before it.
type Seen = (EventKind, i32, Option<i32>);

/// Records each event it sees.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Ornament for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }
    fn mask(&self) -> EventMask {
        EventMask::ALL
    }
    fn on_event(&mut self, ev: &Event, d: &mut Decision) {
        let pid = ev.task().pid.unwrap_or(-1);
        self.seen
            .lock()
            .expect("lock")
            .push((ev.kind(), pid, d.denied()));
    }
}

pub(super) fn limits() -> Limits {
    Limits {
        stop: Arc::new(AtomicBool::new(false)),
        timeout: Some(Duration::from_secs(20)),
    }
}

fn mkdir_denied() -> WatchConfig {
    WatchConfig {
        fork: true,
        exec: true,
        exit: true,
        syscalls: SyscallWatch::Named(vec!["mkdirat".into()]),
        deny: vec![("mkdirat".into(), 1)],
        ..WatchConfig::default()
    }
}

fn session(w: &World, engine: &FakeEngine, cfg: &WatchConfig) -> Result<Session, SessionError> {
    Session::new(engine, Arc::new(w.g.profile.clone()), w.g.layout, cfg)
}

fn armed(log: &[Logged]) -> Vec<(String, bool, bool)> {
    log.iter()
        .filter_map(|l| match l {
            Logged::Armed { symbol, hold, deny } => Some((symbol.clone(), *hold, *deny)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_kvm_like_engine_denies_at_the_syscalls_own_entry_function() {
    each_world(|w| {
        let mkdirat = w.g.profile.syscall_nr("mkdirat").expect("nr");
        let mut e = FakeEngine::new(
            w.g.clone(),
            FakeEngine::kvm_like(),
            vec![
                Step::hit("__x64_sys_mkdirat", w.mkdir, w.mkdir_regs.raw()),
                Step::hit("proc_exit_connector", w.mkdir, w.mkdir.raw()),
                Step::PowerOff,
            ],
        );
        let mut s = session(w, &e, &mkdir_denied()).expect("session");
        let rules = s.probes().deny_rules().clone();
        assert_eq!(rules.get(&mkdirat), Some(&1));
        s.attach(Box::new(DenySyscalls::new(rules)));
        let rec = Recorder::default();
        s.attach(Box::new(rec.clone()));
        s.arm(&mut e).expect("arm");
        let log = e.log();
        let arms = armed(&log.lock().expect("lock"));
        assert!(
            arms.contains(&("__x64_sys_mkdirat".into(), true, true)),
            "{arms:?}"
        );
        assert!(!arms.iter().any(|a| a.0 == "do_syscall_64"), "{arms:?}");
        assert!(!log.lock().expect("lock").contains(&Logged::DenyEnabled));
        assert_eq!(s.run(&mut e, &limits()).expect("run"), GuestExit::PowerOff);
        s.finish();
        assert_eq!(
            e.answers(),
            vec![
                ("__x64_sys_mkdirat".into(), Action::DenySyscall { errno: 1 }),
                ("proc_exit_connector".into(), Action::Continue),
            ]
        );
        assert_eq!(
            rec.seen(),
            vec![
                (EventKind::Syscall, 11, Some(1)),
                (EventKind::Exit, 11, None)
            ]
        );
    });
}

#[test]
fn a_plugin_like_engine_denies_at_the_dispatcher() {
    each_world(|w| {
        let mkdirat = w.g.profile.syscall_nr("mkdirat").expect("nr");
        let mut e = FakeEngine::new(
            w.g.clone(),
            FakeEngine::plugin_like(),
            vec![
                Step::Hit {
                    symbol: "do_syscall_64".into(),
                    vcpu: 1,
                    current: w.mkdir,
                    rdi: w.mkdir_regs.raw(),
                    rsi: u64::from(mkdirat),
                },
                Step::PowerOff,
            ],
        );
        let mut s = session(w, &e, &mkdir_denied()).expect("session");
        s.attach(Box::new(DenySyscalls::new(s.probes().deny_rules().clone())));
        s.arm(&mut e).expect("arm");
        let arms = armed(&e.log().lock().expect("lock"));
        assert!(
            arms.contains(&("do_syscall_64".into(), true, true)),
            "{arms:?}"
        );
        assert!(e.log().lock().expect("lock").contains(&Logged::DenyEnabled));
        // Fork and proc_exec/exit_connector are captured at the hit: not held.
        assert!(
            arms.contains(&("proc_fork_connector".into(), false, false)),
            "{arms:?}"
        );
        s.run(&mut e, &limits()).expect("run");
        assert_eq!(
            e.answers(),
            vec![("do_syscall_64".into(), Action::DenySyscall { errno: 1 })]
        );
    });
}

#[test]
fn what_an_engine_cannot_do_is_refused_before_the_guest_runs() {
    each_world(|w| {
        let mut caps = FakeEngine::kvm_like();
        caps.deny_at = ornament_engine::DenyAt::Nowhere;
        let e = FakeEngine::new(w.g.clone(), caps, vec![]);
        let err = session(w, &e, &mkdir_denied()).expect_err("cannot deny");
        assert!(err.to_string().contains("cannot deny"), "{err}");
        let e = FakeEngine::new(w.g.clone(), FakeEngine::kvm_like(), vec![]);
        let all = WatchConfig {
            syscalls: SyscallWatch::All,
            ..WatchConfig::default()
        };
        let err = session(w, &e, &all).expect_err("no dispatcher probes");
        assert!(err.to_string().contains("do_syscall_64"), "{err}");
    });
}

/// Attaches `late` through the queue at its first event (during delivery).
struct Attacher {
    queue: RegistryQueue,
    late: Option<Recorder>,
}

impl Ornament for Attacher {
    fn name(&self) -> &str {
        "attacher"
    }
    fn on_event(&mut self, _ev: &Event, _d: &mut Decision) {
        if let Some(r) = self.late.take() {
            self.queue.attach(Box::new(r));
        }
    }
}

#[test]
fn ornaments_run_in_order_scopes_filter_and_attach_during_delivery_waits_a_turn() {
    each_world(|w| {
        let cfg = WatchConfig {
            fork: true,
            exec: true,
            exit: true,
            ..WatchConfig::default()
        };
        let mut e = FakeEngine::new(
            w.g.clone(),
            FakeEngine::kvm_like(),
            vec![
                Step::hit("proc_fork_connector", w.sh, w.mkdir.raw()),
                Step::hit("proc_exec_connector", w.mkdir, w.mkdir.raw()),
                Step::hit("proc_exit_connector", w.kthread, w.kthread.raw()),
                Step::hit("proc_exit_connector", w.mkdir, w.mkdir.raw()),
                Step::PowerOff,
            ],
        );
        let mut s = session(w, &e, &cfg).expect("session");
        let all = Recorder::default();
        let followed = Recorder::default();
        let late = Recorder::default();
        let queue = s.registry().queue();
        s.attach(Box::new(all.clone()));
        s.attach(scoped(
            Scope::Pid(10, true),
            &crate::command::CommandView::default(),
            Box::new(followed.clone()),
        ));
        s.attach(Box::new(Attacher {
            queue,
            late: Some(late.clone()),
        }));
        s.arm(&mut e).expect("arm");
        s.run(&mut e, &limits()).expect("run");
        use EventKind::{Exec, Exit, Fork};
        assert_eq!(
            all.seen(),
            vec![
                (Fork, 10, None),
                (Exec, 11, None),
                (Exit, 13, None),
                (Exit, 11, None)
            ]
        );
        // --pid 10 --follow: the child forked by 10 is followed; the kernel thread is not.
        assert_eq!(
            followed.seen(),
            vec![(Fork, 10, None), (Exec, 11, None), (Exit, 11, None)]
        );
        // Attached while the first event was delivered: sees the events after it.
        assert_eq!(
            late.seen(),
            vec![(Exec, 11, None), (Exit, 13, None), (Exit, 11, None)]
        );
        // Every hit held (this engine captures nothing) and answered once.
        assert_eq!(e.answers().len(), 4);
    });
}

/// Resume the guest once it is paused, counting the pauses.
fn resumer(control: Arc<Control>, times: usize) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut n = 0;
        let begin = Instant::now();
        while n < times && begin.elapsed() < Duration::from_secs(20) {
            if control.paused.load(Ordering::SeqCst) {
                n += 1;
                control.resume_requested.store(true, Ordering::SeqCst);
                while control.paused.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        n
    })
}

#[test]
fn an_ornament_pauses_the_guest_at_exec_until_a_resume_request() {
    each_world(|w| {
        let cfg = WatchConfig {
            fork: true,
            exec: true,
            exit: true,
            ..WatchConfig::default()
        };
        let mut e = FakeEngine::new(
            w.g.clone(),
            FakeEngine::plugin_like(),
            vec![
                Step::hit("proc_exec_connector", w.sh, w.sh.raw()),
                Step::hit("proc_exec_connector", w.mkdir, w.mkdir.raw()),
                Step::hit("proc_exit_connector", w.mkdir, w.mkdir.raw()),
                Step::PowerOff,
            ],
        );
        let mut s = session(w, &e, &cfg).expect("session");
        s.set_exec_acts(true);
        s.attach(Box::new(PauseOnExec::new("/usr/bin/mkdir")));
        let notices = Arc::new(Mutex::new(Vec::new()));
        let n2 = notices.clone();
        s.on_notice(move |n| n2.lock().expect("lock").push(n));
        s.arm(&mut e).expect("arm");
        // Exec holds (an ornament acts there) even on an engine that captures at the hit.
        let arms = armed(&e.log().lock().expect("lock"));
        assert!(
            arms.contains(&("proc_exec_connector".into(), true, false)),
            "{arms:?}"
        );
        let r = resumer(s.control(), 1);
        s.run(&mut e, &limits()).expect("run");
        assert_eq!(r.join().expect("resumer"), 1);
        let log = e.log().lock().expect("lock").clone();
        let after_setup: Vec<&Logged> = log
            .iter()
            .filter(|l| !matches!(l, Logged::Armed { .. }))
            .collect();
        assert_eq!(
            after_setup,
            vec![
                &Logged::Resumed,
                &Logged::Answered {
                    symbol: "proc_exec_connector".into(),
                    action: Action::Continue
                },
                &Logged::Answered {
                    symbol: "proc_exec_connector".into(),
                    action: Action::Continue
                },
                &Logged::Pause,
                &Logged::Resumed,
            ]
        );
        assert_eq!(
            *notices.lock().expect("lock"),
            vec![Notice::Paused { by_ornament: true }, Notice::Resumed]
        );
    });
}

#[test]
fn control_pauses_and_resumes_and_stop_kills_the_guest() {
    each_world(|w| {
        let cfg = WatchConfig {
            exit: true,
            ..WatchConfig::default()
        };
        let mut e = FakeEngine::new(w.g.clone(), FakeEngine::kvm_like(), vec![]);
        let mut s = session(w, &e, &cfg).expect("session");
        s.arm(&mut e).expect("arm");
        let control = s.control();
        control.pause_requested.store(true, Ordering::SeqCst);
        let lim = limits();
        let stop = lim.stop.clone();
        let c2 = control.clone();
        let t = std::thread::spawn(move || {
            while !c2.paused.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            c2.resume_requested.store(true, Ordering::SeqCst);
            while c2.paused.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            stop.store(true, Ordering::SeqCst);
        });
        let err = s.run(&mut e, &lim).expect_err("stopped");
        t.join().expect("thread");
        assert!(matches!(err, SessionError::Interrupted), "{err}");
        let log = e.log().lock().expect("lock").clone();
        let tail: Vec<&Logged> = log
            .iter()
            .filter(|l| !matches!(l, Logged::Armed { .. }))
            .collect();
        assert_eq!(
            tail,
            vec![
                &Logged::Resumed,
                &Logged::Pause,
                &Logged::Resumed,
                &Logged::Stopped
            ]
        );
    });
}
