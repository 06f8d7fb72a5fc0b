//! \[3\] The probe set: which kernel functions to trap for the events asked for, with
//! fallbacks when a hook is missing from the profile.
//!
//! | event   | hook (argument)                                     | fallback |
//! |---------|-----------------------------------------------------|----------|
//! | fork    | `proc_fork_connector(child)`, current = parent       | `wake_up_new_task(child)` |
//! | exec    | `proc_exec_connector(task)` after a successful exec | `begin_new_exec(bprm)`: the point of no return (an exec can still fail there if de_thread is killed) |
//! | exit    | `proc_exit_connector(task)`, `task->exit_code` set   | `do_exit(code)`, current = exiting task |
//! | setid   | `proc_id_connector(task, which)` after commit_creds  | none |
//! | syscall | named: `__x64_sys_NAME(regs)`, one per syscall       | `do_syscall_64` filtered to those numbers |
//! | syscall | all: `do_syscall_64(regs, nr)`                       | none |
//! | deny    | held `do_syscall_64(regs, nr)` filtered to the denied numbers | none: an error |
//! | syscall_return | `syscall_exit_to_user_mode(regs)`, filtered on `regs->orig_ax` to the watched numbers | none |
//! | exec_failed | `__x64_sys_execve`/`__x64_sys_execveat` (the attempt) open a window in which `syscall_exit_to_user_mode(regs)`, filtered to that syscall, is armed by the engine itself until every attempt has returned or exited | none |
//! | signal  | `__send_signal_locked(sig, info, t, type, force)`, current = sender | `send_signal_locked(sig, info, t, type)` |
//! | signal_deliver | handler: `signal_setup_done(failed, ksig, stepping)`; stop: `do_signal_stop(sig)`; kill: `do_group_exit(code)` with a signal in `code` | none |
//!
//! A hook missing from the profile disables only the events that need it, with a
//! warning naming it. Lifecycle probes hold the vCPU (the task cannot vanish while it is
//! read); syscall probes hold only where a deny rule applies (or
//! [`WatchConfig::hold_syscalls`]).
//!
//! This module also owns the layout of the memory reads an engine may do at the hit
//! ([`hit_reads`]: `ProbeHit::mem`, and [`hit_bytes`]: `ProbeHit::bytes`): the syscall
//! arguments, the current task, and for fork, exec and exit every value those events report
//! that could vanish once the vCPU runs on ([`captured_at_hit`]); with them an engine need not
//! hold the vCPU for those events.

use crate::event::EventKind;
use crate::kaslr::KernelLayout;
use crate::profile::Profile;
use ornament_engine::wire::Window;
use ornament_engine::{Gva, ProbeId};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// `which_id` of `proc_id_connector` for a user-id change (`PROC_EVENT_UID`).
pub const PROC_EVENT_UID: u64 = 0x4;
/// `which_id` of `proc_id_connector` for a group-id change (`PROC_EVENT_GID`).
pub const PROC_EVENT_GID: u64 = 0x40;
/// Largest errno a denied syscall may return (`MAX_ERRNO`).
pub const MAX_ERRNO: i32 = 4095;

/// Why a probe set could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum ProbesError {
    /// unknown syscall {name:?}: this kernel has no such x86-64 syscall
    UnknownSyscall {
        /// The name given.
        name: String,
    },
    /// errno {errno} for syscall {syscall} is outside 1..=4095
    BadErrno {
        /// The syscall.
        syscall: String,
        /// The errno given.
        errno: i32,
    },
    /// unknown errno {name:?}: give a number in 1..=4095 or a name such as EPERM
    UnknownErrno {
        /// The text given.
        name: String,
    },
    /// unknown event {name:?} in the watch list: expected fork, exec, exit, setid, signal, syscall or syscall=NAME,...
    UnknownWatch {
        /// The item given.
        name: String,
    },
    /// cannot deny syscalls: the profile has no {symbol}
    NoDenyHook {
        /// The missing symbol.
        symbol: &'static str,
    },
    /// cannot deny syscall {name}: the profile has no {symbol}, its entry function
    NoDenyEntry {
        /// The syscall.
        name: String,
        /// The missing entry function.
        symbol: String,
    },
    /// every-syscall watching and denying at entry functions together are not supported
    AllWithEntryDeny,
}

/// Which syscalls to report.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SyscallWatch {
    /// None.
    #[default]
    None,
    /// Every syscall (one trap per syscall: costly).
    All,
    /// Only these (by name, e.g. `openat`); the others cost nothing.
    Named(Vec<String>),
}

/// What to watch (plain data, validated by [`ProbeSet::new`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WatchConfig {
    /// Fork/clone events.
    pub fork: bool,
    /// Exec events.
    pub exec: bool,
    /// Exit events.
    pub exit: bool,
    /// Setid events.
    pub setid: bool,
    /// Signal events: generated (`signal`) and delivered (`signal_deliver`).
    pub signals: bool,
    /// Syscall-entry events.
    pub syscalls: SyscallWatch,
    /// Syscalls to refuse: (name, errno in 1..=4095).
    pub deny: Vec<(String, i32)>,
    /// Hold the vCPU at every syscall probe (an ornament may pause the guest before the
    /// syscall runs); otherwise only probes covering a denied syscall hold.
    pub hold_syscalls: bool,
    /// Syscalls an ornament may decide to deny (by its own rule, say a path), with no
    /// rule of their own: their probes are placed and held as for `deny`.
    pub may_deny: Vec<String>,
    /// Report what each watched syscall returned (`syscall_return` events) and failed execs
    /// (`exec_failed`, with `exec`): probes at `syscall_exit_to_user_mode`, which only an
    /// engine that traps any instruction and filters at the hit can afford.
    pub results: bool,
    /// Deny at a held probe on each denied syscall's own entry function
    /// (`__x64_sys_NAME`, for engines that return from it early) instead of at the
    /// dispatcher `do_syscall_64` (for engines that deny through guest memory).
    pub deny_at_entry: bool,
}

/// Where a fork event is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForkHook {
    /// `proc_fork_connector(struct task_struct *child)`, end of `copy_process`.
    ProcForkConnector,
    /// `wake_up_new_task(struct task_struct *child)`, in `kernel_clone`.
    WakeUpNewTask,
}

/// Where an exec event is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExecHook {
    /// `proc_exec_connector(struct task_struct *task)`, after a successful exec.
    ProcExecConnector,
    /// `begin_new_exec(struct linux_binprm *bprm)`: exec's point of no return, the new
    /// program's argv in `bprm->mm` at `bprm->p`.
    BeginNewExec,
}

/// Where an exit event is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitHook {
    /// `proc_exit_connector(struct task_struct *task)`, `task->exit_code` set.
    ProcExitConnector,
    /// `do_exit(long code)`, current is the exiting task.
    DoExit,
}

/// Where a syscall event is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyscallHook {
    /// `__x64_sys_NAME(const struct pt_regs *regs)`: one syscall.
    Function {
        /// Its number.
        nr: u32,
    },
    /// `do_syscall_64(struct pt_regs *regs, int nr)`: every syscall (or those of
    /// [`ArmSpec::syscall_filter`]).
    DoSyscall64,
}

/// Where a signal event is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignalHook {
    /// `__send_signal_locked(int sig, struct kernel_siginfo *info, struct task_struct *t,
    /// enum pid_type type, bool force)`: a signal generated (current sends it).
    SendLocked,
    /// `send_signal_locked(int sig, struct kernel_siginfo *info, struct task_struct *t,
    /// enum pid_type type)`: the same, where the inner function is missing.
    SendLockedOuter,
    /// `signal_setup_done(int failed, struct ksignal *ksig, int stepping)`: a handler's frame
    /// was set up (delivered to a handler; `failed`: it could not be).
    Handler,
    /// `do_signal_stop(int signr)`: the task stops.
    Stop,
    /// `do_group_exit(int exit_code)`: with a signal in `exit_code`, the task dies of it.
    Kill,
}

/// What a probe at `syscall_exit_to_user_mode(struct pt_regs *regs)` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReturnHook {
    /// The result of a watched syscall (`regs->ax`), paired with its entry.
    Syscall,
    /// An `execve` that returned an error: a failed exec (its file name, `regs->di`, is
    /// read at the hit).
    Exec,
    /// The same for `execveat` (its file name is `regs->si`).
    ExecAt,
}

/// What a probe reports, and how its hit is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    /// Fork.
    Fork(ForkHook),
    /// Exec.
    Exec(ExecHook),
    /// Exit.
    Exit(ExitHook),
    /// `proc_id_connector(struct task_struct *task, int which_id)`.
    Setid,
    /// Syscall entry.
    Syscall(SyscallHook),
    /// Syscall return.
    Return(ReturnHook),
    /// Signal generated or delivered.
    Signal(SignalHook),
    /// `__x64_sys_execve` or `__x64_sys_execveat`: an exec begins. It produces no event;
    /// it opens the window of its failed-exec return probe (the engine arms that probe
    /// until every exec in flight has returned: [`ArmSpec::window`]).
    ExecAttempt,
}

impl ProbeKind {
    /// The event kind the probe produces.
    pub fn event(&self) -> EventKind {
        match self {
            ProbeKind::Fork(_) => EventKind::Fork,
            ProbeKind::Exec(_) => EventKind::Exec,
            ProbeKind::Exit(_) => EventKind::Exit,
            ProbeKind::Setid => EventKind::Setid,
            ProbeKind::Syscall(_) => EventKind::Syscall,
            ProbeKind::Return(ReturnHook::Syscall) => EventKind::SyscallReturn,
            ProbeKind::Return(ReturnHook::Exec | ReturnHook::ExecAt) => EventKind::ExecFailed,
            ProbeKind::Signal(SignalHook::SendLocked | SignalHook::SendLockedOuter) => {
                EventKind::Signal
            }
            ProbeKind::Signal(_) => EventKind::SignalDeliver,
            ProbeKind::ExecAttempt => EventKind::ExecFailed,
        }
    }
}

/// One probe to arm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmSpec {
    /// Its id (the index in [`ProbeSet::specs`]).
    pub id: ProbeId,
    /// Runtime (slid) address of the function's first instruction.
    pub at: Gva,
    /// The kernel symbol.
    pub symbol: String,
    /// What it reports.
    pub kind: ProbeKind,
    /// Hold the vCPU until the hit is answered.
    pub hold: bool,
    /// For `do_syscall_64`: report only hits whose `nr` (the low 32 bits of rsi at the
    /// probe) is one of these (sorted); `None`: all. For `syscall_exit_to_user_mode`: the
    /// same on `regs->orig_ax`. An engine that cannot filter delivers every hit and the
    /// monitor drops the others (answering `Continue`).
    pub syscall_filter: Option<Vec<u32>>,
    /// Its part in a window ([`Window`]): a failed-exec return probe is armed by the engine
    /// only while an exec is in flight (it would otherwise cost every syscall of the run a
    /// filter test), from its attempt's hit (`Opens`) to its own (`Closes`); the session
    /// closes the part of a task that exited inside ([`crate::monitor::HitOutcome::close`]).
    pub window: Window,
}

impl ArmSpec {
    /// Armed when the guest starts: all but the probes a window arms.
    pub fn armed_at_start(&self) -> bool {
        self.window != Window::Closes
    }
}

/// A hook that was missing from the profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeWarning {
    /// The event concerned.
    pub event: EventKind,
    /// The missing symbol.
    pub symbol: String,
    /// The symbol used instead, or `None` when the event is disabled.
    pub fallback: Option<String>,
}

impl fmt::Display for ProbeWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.fallback {
            Some(fb) => write!(
                f,
                "the profile has no {}: {} events come from {} instead",
                self.symbol, self.event, fb
            ),
            None => write!(
                f,
                "the profile has no {}: {} events are disabled",
                self.symbol, self.event
            ),
        }
    }
}

/// Which syscall numbers are reported as events.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Reported {
    /// None.
    #[default]
    None,
    /// All.
    All,
    /// These.
    Only(BTreeSet<u32>),
}

/// The probes to arm for a [`WatchConfig`] on one kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSet {
    specs: Vec<ArmSpec>,
    warnings: Vec<ProbeWarning>,
    reported: Reported,
    deny: BTreeMap<u32, i32>,
    deniable: BTreeSet<u32>,
}

struct Builder<'a> {
    profile: &'a Profile,
    layout: KernelLayout,
    specs: Vec<ArmSpec>,
    warnings: Vec<ProbeWarning>,
}

impl Builder<'_> {
    fn addr(&self, symbol: &str) -> Option<Gva> {
        self.profile
            .symbol(symbol)
            .ok()
            .or_else(|| self.profile.syscall_entry_points.get(symbol).copied())
            .map(|a| self.layout.virt(a))
    }

    fn push(&mut self, at: Gva, symbol: &str, kind: ProbeKind, hold: bool, f: Option<Vec<u32>>) {
        self.push_id(at, symbol, kind, hold, f);
    }

    /// As [`Builder::push`], returning the new probe's id.
    fn push_id(
        &mut self,
        at: Gva,
        symbol: &str,
        kind: ProbeKind,
        hold: bool,
        f: Option<Vec<u32>>,
    ) -> ProbeId {
        let id = ProbeId(u32::try_from(self.specs.len()).unwrap_or(u32::MAX));
        self.specs.push(ArmSpec {
            id,
            at,
            symbol: symbol.to_owned(),
            kind,
            hold,
            syscall_filter: f,
            window: Window::None,
        });
        id
    }

    /// A held probe on the entry function of each denied syscall not already probed
    /// (`done`); every entry exists (checked before).
    fn deny_entries(
        &mut self,
        deny: &BTreeMap<u32, i32>,
        done: &BTreeSet<u32>,
        entry_of: impl Fn(u32) -> (String, String),
    ) {
        for &nr in deny.keys() {
            if done.contains(&nr) {
                continue;
            }
            let (_, sym) = entry_of(nr);
            if let Some(at) = self.addr(&sym) {
                self.push(
                    at,
                    &sym,
                    ProbeKind::Syscall(SyscallHook::Function { nr }),
                    true,
                    None,
                );
            }
        }
    }

    /// The signal probes: generation, and the three ways of delivery. Never held: every
    /// value the events report is read at the hit (or, on engines that hold every hit,
    /// while held).
    fn signals(&mut self) {
        let mut gen = Vec::new();
        for (sym, hook) in [
            ("__send_signal_locked", SignalHook::SendLocked),
            ("send_signal_locked", SignalHook::SendLockedOuter),
        ] {
            gen.push((sym, ProbeKind::Signal(hook)));
        }
        for (i, (sym, kind)) in gen.iter().enumerate() {
            if let Some(at) = self.addr(sym) {
                self.push(at, sym, *kind, false, None);
                break;
            }
            self.warn(EventKind::Signal, sym, gen.get(i + 1).map(|g| g.0));
        }
        for (sym, hook) in [
            ("signal_setup_done", SignalHook::Handler),
            ("do_signal_stop", SignalHook::Stop),
            ("do_group_exit", SignalHook::Kill),
        ] {
            let readable =
                hook != SignalHook::Handler || self.profile.offset("ksignal", "sig").is_ok();
            match self.addr(sym).filter(|_| readable) {
                Some(at) => self.push(at, sym, ProbeKind::Signal(hook), false, None),
                None => self.warn(EventKind::SignalDeliver, sym, None),
            }
        }
    }

    /// The probes at `syscall_exit_to_user_mode`: the watched syscalls' results, and with
    /// exec watching the failed execs.
    fn returns(&mut self, reported: &Reported, cfg: &WatchConfig) {
        const EXIT: &str = "syscall_exit_to_user_mode";
        let want_results = *reported != Reported::None;
        if !want_results && !cfg.exec {
            return;
        }
        let Some(at) = self.addr(EXIT) else {
            if want_results {
                self.warn(EventKind::SyscallReturn, EXIT, None);
            }
            if cfg.exec {
                self.warn(EventKind::ExecFailed, EXIT, None);
            }
            return;
        };
        match reported {
            Reported::None => {}
            Reported::All => self.push(
                at,
                EXIT,
                ProbeKind::Return(ReturnHook::Syscall),
                cfg.hold_syscalls,
                None,
            ),
            Reported::Only(nrs) => self.push(
                at,
                EXIT,
                ProbeKind::Return(ReturnHook::Syscall),
                cfg.hold_syscalls,
                Some(nrs.iter().copied().collect()),
            ),
        }
        if cfg.exec {
            // Each exec syscall's return probe, armed only while an exec of it is in flight:
            // its attempt's entry function opens the window, the return closes it. Neither
            // holds: the return reads the file name and the result at the hit.
            for (name, hook) in [
                ("execve", ReturnHook::Exec),
                ("execveat", ReturnHook::ExecAt),
            ] {
                let (Some(nr), sym) = (self.profile.syscall_nr(name), format!("__x64_sys_{name}"))
                else {
                    continue;
                };
                let Some(entry) = self.addr(&sym) else {
                    self.warn(EventKind::ExecFailed, &sym, None);
                    continue;
                };
                let ret = self.push_id(
                    at,
                    EXIT,
                    ProbeKind::Return(hook),
                    cfg.hold_syscalls,
                    Some(vec![nr]),
                );
                let attempt = self.push_id(entry, &sym, ProbeKind::ExecAttempt, false, None);
                for (id, window) in [(ret, Window::Closes), (attempt, Window::Opens(ret.0))] {
                    if let Some(s) = self.specs.get_mut(id.0 as usize) {
                        s.window = window;
                    }
                }
            }
        }
    }

    fn warn(&mut self, event: EventKind, symbol: &str, fallback: Option<&str>) {
        let w = ProbeWarning {
            event,
            symbol: symbol.to_owned(),
            fallback: fallback.map(str::to_owned),
        };
        tracing::warn!("{w}");
        self.warnings.push(w);
    }

    /// The first present of `hooks` (symbol, kind), warning for each missing one.
    fn lifecycle(&mut self, event: EventKind, hooks: &[(&str, ProbeKind)]) {
        for (i, (sym, kind)) in hooks.iter().enumerate() {
            if let Some(at) = self.addr(sym) {
                self.push(at, sym, *kind, true, None);
                return;
            }
            self.warn(event, sym, hooks.get(i + 1).map(|h| h.0));
        }
    }
}

impl ProbeSet {
    /// The probes for `cfg` on the kernel of `profile`, moved by `layout`. Unknown
    /// syscall names and errno values outside 1..=4095 are errors; a missing hook only
    /// disables its events (see [`ProbeSet::warnings`]).
    pub fn new(
        profile: &Profile,
        layout: KernelLayout,
        cfg: &WatchConfig,
    ) -> Result<Self, ProbesError> {
        let rules = deny_rules(profile, &cfg.deny)?;
        // Where a deny must be possible: the rules' syscalls and those ornaments may deny.
        let mut deny = rules.clone();
        for nr in syscall_numbers(profile, &cfg.may_deny)? {
            deny.entry(nr).or_insert(0);
        }
        let named = match &cfg.syscalls {
            SyscallWatch::Named(names) => Some(syscall_numbers(profile, names)?),
            _ => None,
        };
        let mut b = Builder {
            profile,
            layout,
            specs: Vec::new(),
            warnings: Vec::new(),
        };
        if cfg.fork {
            b.lifecycle(
                EventKind::Fork,
                &[
                    (
                        "proc_fork_connector",
                        ProbeKind::Fork(ForkHook::ProcForkConnector),
                    ),
                    ("wake_up_new_task", ProbeKind::Fork(ForkHook::WakeUpNewTask)),
                ],
            );
        }
        if cfg.exec {
            b.lifecycle(
                EventKind::Exec,
                &[
                    (
                        "proc_exec_connector",
                        ProbeKind::Exec(ExecHook::ProcExecConnector),
                    ),
                    ("begin_new_exec", ProbeKind::Exec(ExecHook::BeginNewExec)),
                ],
            );
        }
        if cfg.exit {
            b.lifecycle(
                EventKind::Exit,
                &[
                    (
                        "proc_exit_connector",
                        ProbeKind::Exit(ExitHook::ProcExitConnector),
                    ),
                    ("do_exit", ProbeKind::Exit(ExitHook::DoExit)),
                ],
            );
        }
        if cfg.setid {
            b.lifecycle(EventKind::Setid, &[("proc_id_connector", ProbeKind::Setid)]);
        }
        if cfg.signals {
            b.signals();
        }

        const DO_SYSCALL_64: &str = "do_syscall_64";
        let dispatcher = b.addr(DO_SYSCALL_64);
        // Denied syscalls go through the dispatcher, or each through its entry function.
        let deny_via_dispatcher = !cfg.deny_at_entry && !deny.is_empty();
        if deny_via_dispatcher && dispatcher.is_none() {
            return Err(ProbesError::NoDenyHook {
                symbol: DO_SYSCALL_64,
            });
        }
        let entry_of = |nr: u32| {
            let name = profile.syscall_name(nr).unwrap_or_default().to_owned();
            let sym = format!("__x64_sys_{name}");
            (name, sym)
        };
        if cfg.deny_at_entry {
            for &nr in deny.keys() {
                let (name, symbol) = entry_of(nr);
                if b.addr(&symbol).is_none() {
                    return Err(ProbesError::NoDenyEntry { name, symbol });
                }
            }
        }
        let kind = ProbeKind::Syscall(SyscallHook::DoSyscall64);
        let reported = match (&cfg.syscalls, named) {
            (SyscallWatch::All, _) => {
                if cfg.deny_at_entry && !deny.is_empty() {
                    return Err(ProbesError::AllWithEntryDeny);
                }
                match dispatcher {
                    Some(at) => {
                        let hold = cfg.hold_syscalls || deny_via_dispatcher;
                        b.push(at, DO_SYSCALL_64, kind, hold, None);
                        Reported::All
                    }
                    None => {
                        b.warn(EventKind::Syscall, DO_SYSCALL_64, None);
                        Reported::None
                    }
                }
            }
            (SyscallWatch::Named(_), Some(nrs)) => {
                let mut reported = BTreeSet::new();
                // Through do_syscall_64: the denied ones (unless denied at entry), and
                // watched ones with no __x64_sys_ entry point.
                let mut via_dispatcher: BTreeSet<u32> = if deny_via_dispatcher {
                    deny.keys().copied().collect()
                } else {
                    BTreeSet::new()
                };
                for nr in nrs {
                    let (_, sym) = entry_of(nr);
                    if !reported.insert(nr) || via_dispatcher.contains(&nr) {
                        continue;
                    }
                    match b.addr(&sym) {
                        Some(at) => b.push(
                            at,
                            &sym,
                            ProbeKind::Syscall(SyscallHook::Function { nr }),
                            cfg.hold_syscalls || deny.contains_key(&nr),
                            None,
                        ),
                        None if dispatcher.is_some() => {
                            b.warn(EventKind::Syscall, &sym, Some(DO_SYSCALL_64));
                            via_dispatcher.insert(nr);
                        }
                        None => {
                            b.warn(EventKind::Syscall, &sym, None);
                            reported.remove(&nr);
                        }
                    }
                }
                if cfg.deny_at_entry {
                    b.deny_entries(&deny, &reported, entry_of);
                }
                if let (Some(at), false) = (dispatcher, via_dispatcher.is_empty()) {
                    let hold = cfg.hold_syscalls || deny_via_dispatcher;
                    b.push(
                        at,
                        DO_SYSCALL_64,
                        kind,
                        hold,
                        Some(via_dispatcher.into_iter().collect()),
                    );
                }
                Reported::Only(reported)
            }
            _ => {
                if cfg.deny_at_entry {
                    b.deny_entries(&deny, &BTreeSet::new(), entry_of);
                } else if let (Some(at), true) = (dispatcher, deny_via_dispatcher) {
                    b.push(
                        at,
                        DO_SYSCALL_64,
                        kind,
                        true,
                        Some(deny.keys().copied().collect()),
                    );
                }
                Reported::None
            }
        };
        if cfg.results {
            b.returns(&reported, cfg);
        }
        Ok(Self {
            specs: b.specs,
            warnings: b.warnings,
            reported,
            deniable: deny.keys().copied().collect(),
            deny: rules,
        })
    }

    /// The probes to arm, in id order.
    pub fn specs(&self) -> &[ArmSpec] {
        &self.specs
    }

    /// The probe with id `id`.
    pub fn get(&self, id: ProbeId) -> Option<&ArmSpec> {
        self.specs
            .get(usize::try_from(id.0).ok()?)
            .filter(|s| s.id == id)
    }

    /// Hooks that were missing, with what was done instead.
    pub fn warnings(&self) -> &[ProbeWarning] {
        &self.warnings
    }

    /// The event kinds some probe reports.
    pub fn events(&self) -> BTreeSet<EventKind> {
        let mut k: BTreeSet<EventKind> = self.specs.iter().map(|s| s.kind.event()).collect();
        if self.reported == Reported::None {
            k.remove(&EventKind::Syscall);
        }
        k
    }

    /// Which syscalls are reported as events.
    pub fn reported_syscalls(&self) -> &Reported {
        &self.reported
    }

    /// True when syscall `nr` is reported as an event.
    pub fn reports_syscall(&self, nr: u32) -> bool {
        match &self.reported {
            Reported::None => false,
            Reported::All => true,
            Reported::Only(s) => s.contains(&nr),
        }
    }

    /// The deny rules: syscall number -> errno.
    pub fn deny_rules(&self) -> &BTreeMap<u32, i32> {
        &self.deny
    }

    /// The syscalls whose probes can deny: the rules' and `may_deny`'s.
    pub fn deniable(&self) -> &BTreeSet<u32> {
        &self.deniable
    }
}

mod config;
mod reads;
pub use config::{deny_rules, errno_name, parse_deny, parse_errno, syscall_numbers, ERRNO_NAMES};
pub use reads::*;

#[cfg(test)]
mod tests;
