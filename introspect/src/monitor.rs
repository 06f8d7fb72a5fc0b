//! \[3\]..\[6\] The monitor: a probe hit in, the task read, an event built and delivered to
//! the ornaments, an action out.
//!
//! ```text
//! ProbeHit -> ProbeSet::get(probe) -> Kernel::current_task_on + hook argument (rdi, rsi)
//!          -> TaskReader -> Event -> Registry::dispatch -> HitOutcome { events, action }
//! ```
//!
//! What each hook reads (see [`crate::probes`] for where they sit):
//! - fork: the header is the parent (current), `child_*` come from the child (rdi);
//! - exec: the task after the exec (rdi at `proc_exec_connector`): `comm`, `filename`
//!   (`mm->exe_file`) and `argv` from its new mm; at the `begin_new_exec` fallback from
//!   `bprm` (rdi): `filename` is `bprm->filename` as passed to exec, `argv` the `argc`
//!   strings at `bprm->p` in `bprm->mm`, `comm` its basename;
//! - exit: `task->exit_code` (rdi at `proc_exit_connector`) or the `do_exit` argument:
//!   `exit_code = (code >> 8) & 0xff`, `signal = code & 0x7f` when non-zero;
//! - syscall: the arguments from the `pt_regs` passed in rdi, the number from the probe
//!   (`__x64_sys_*`) or rsi (`do_syscall_64`), the path from the caller's user memory
//!   (through `mm->pgd`);
//! - setid: the task (rdi) and which ids changed (rsi).
//!
//! Values an engine read at the hit (`ProbeHit::mem`, in the layout of
//! [`crate::probes::hit_reads`]) are taken first: the current task, the syscall arguments, and
//! for fork, exec and exit the task header and the event's fields, for exec its command line
//! (`ProbeHit::bytes`) and its executable's dentry (so those events are exact even when the
//! vCPU was not held and the task has since exited or been reaped). Whatever the hit does not
//! carry (an engine without memory reads, or a read that failed) is read from guest memory
//! now, so the events are the same either way.
//!
//! Nothing read from the guest can make it fail: an unreadable value becomes `null` in
//! the event, and a hit that cannot be attributed is answered `Continue`.

use crate::event::{
    path_arg, Event, ExecEvent, ExitEvent, ForkEvent, IdChange, SetidEvent, SyscallEvent,
    TaskHeader, MAX_ARGV_ENTRIES, MAX_PATH_BYTES,
};
use crate::kaslr::KernelLayout;
use crate::kernel::{is_kernel_address, Kernel, KernelError};
use crate::lineage::{Lineage, RunInfo};
use crate::ornament::Registry;
use crate::paging::PageRoot;
use crate::probes::{
    dentry_stamp, ArmSpec, ExecHook, ExitHook, ProbeKind, ProbeSet, SyscallHook, MEM_CHILD_FLAGS,
    MEM_CHILD_MM, MEM_CHILD_PID, MEM_CHILD_TGID, MEM_CURRENT_TASK, MEM_EXEC_DENTRY,
    MEM_EXEC_EXE_FILE, MEM_EXEC_MM, MEM_EXEC_NAME_HASH, MEM_EXEC_PARENT, MEM_EXIT_CODE,
    MEM_EXIT_LIVE, MEM_EXIT_SIGNAL, MEM_HDR_COMM, MEM_HDR_CRED, MEM_HDR_EUID, MEM_HDR_PID,
    MEM_HDR_PPID, MEM_HDR_REAL_PARENT, MEM_HDR_TGID, MEM_HDR_UID, MEM_SYSCALL_ARGS, PROC_EVENT_GID,
    PROC_EVENT_UID,
};
use crate::probes::{ReturnHook, SignalHook, MEM_KILL_FLAGS, MEM_KILL_GROUP_CODE};
use crate::probes::{
    MEM_EXEC_FS, MEM_EXEC_PWD_DENTRY, MEM_EXEC_PWD_HASH, MEM_EXEC_PWD_MNT, MEM_EXEC_PWD_PARENT,
};
use crate::profile::{Profile, ProfileError};
use crate::task::{Argv, Limits, TaskError, TaskOffsets, TaskReader, PF_KTHREAD};
use crate::vmem::VirtMem;
use ornament_engine::{Action, Gva, PhysMemory, ProbeHit, ProbeId};
use std::collections::HashMap;
use std::sync::Arc;

mod reader;
mod returns;
mod signal;
use reader::{kptr_at_hit, low32, low32_signed, Reader};
use returns::PendingCall;
pub use returns::MAX_PENDING_CALLS;

/// The slots of the stamps an exec probe read at the hit for the executable's dentry ...
const EXE_STAMP: [usize; 2] = [MEM_EXEC_NAME_HASH, MEM_EXEC_PARENT];
/// ... and for the working directory's.
const PWD_STAMP: [usize; 2] = [MEM_EXEC_PWD_HASH, MEM_EXEC_PWD_PARENT];

/// Why a monitor could not be built.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum MonitorError {
    /// the profile lacks a field the task reader needs
    Task(#[from] TaskError),
    /// the profile lacks a field the monitor needs
    Profile(#[from] ProfileError),
}

/// What one hit produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HitOutcome {
    /// The events built (at most one today), in delivery order; syscalls trapped only
    /// for a deny rule are delivered to ornaments but not listed here.
    pub events: Vec<Event>,
    /// The answer for the engine.
    pub action: Action,
    /// Some ornament asked to pause the guest (also true when `action` is a deny that
    /// took precedence: pause after answering).
    pub pause: bool,
    /// Windows ([`crate::probes::ArmSpec::window`]) to close one task's part of: the task
    /// exited inside an exec, so its return probe will never close it.
    pub close: Vec<ProbeId>,
}

impl HitOutcome {
    fn nothing() -> Self {
        Self {
            events: Vec::new(),
            action: Action::Continue,
            pause: false,
            close: Vec::new(),
        }
    }
}

/// Counters (hot paths count instead of logging).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MonitorStats {
    /// Hits handled.
    pub hits: u64,
    /// Events delivered to the ornaments.
    pub events: u64,
    /// Hits of a probe not in the set.
    pub unknown_probe: u64,
    /// `do_syscall_64` hits outside the probe's filter, or with a negative number.
    pub filtered: u64,
    /// Hits whose current task could not be found (the event has `null` task fields).
    pub no_current: u64,
    /// Watched syscalls whose entry could not be remembered for pairing with its return
    /// (more than [`MAX_PENDING_CALLS`] tasks inside one at once): their returns carry no
    /// `entry_time_ns`, and a task that exits inside one gets no `syscall_return`.
    pub unpaired: u64,
}

/// What [`Monitor::build`] made of a hit.
struct Built {
    ev: Event,
    no_current: bool,
    /// The task the event is about (`task_struct` address), when known: the key that pairs
    /// a syscall's entry with its return.
    task: Option<Gva>,
}

#[derive(Debug, Clone, Copy)]
struct BprmOffsets {
    filename: u64,
    argc: u64,
    p: u64,
    mm: u64,
}

/// Turns probe hits into events and actions.
pub struct Monitor {
    mem: Arc<dyn PhysMemory>,
    profile: Arc<Profile>,
    layout: KernelLayout,
    probes: ProbeSet,
    registry: Registry,
    task_off: TaskOffsets,
    limits: Limits,
    exit_code: u64,
    signal_live: Option<u64>,
    /// `d_name.hash` and `d_parent` offsets in `struct dentry` ([`dentry_stamp`]).
    dentry_stamp: Option<(u64, u64)>,
    bprm: Option<BprmOffsets>,
    /// Syscall names and path-argument index, by number.
    syscalls: Vec<Option<(String, Option<usize>)>>,
    /// Stamps each event with its wall-clock time and process identities.
    lineage: Lineage,
    /// Watched syscalls in flight, by task (only when their results are reported).
    pending: HashMap<Gva, PendingCall>,
    /// The probe set reports syscall results.
    pairs_returns: bool,
    /// Tasks inside an `execve`/`execveat` (from its entry until its return or exit), with
    /// the window their attempt opened.
    in_exec: HashMap<Gva, ProbeId>,
    stats: MonitorStats,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("release", &self.profile.kernel.release)
            .field("layout", &self.layout)
            .field("probes", &self.probes.specs().len())
            .field("registry", &self.registry)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Monitor {
    /// A monitor for the kernel of `profile` (moved by `layout`) in `mem`, handling hits
    /// of `probes`. Ornaments are attached through [`Monitor::registry_mut`].
    pub fn new(
        mem: Arc<dyn PhysMemory>,
        profile: Arc<Profile>,
        layout: KernelLayout,
        probes: ProbeSet,
    ) -> Result<Self, MonitorError> {
        let task_off = TaskOffsets::from_profile(&profile).map_err(TaskError::from)?;
        let exit_code = profile.offset("task_struct", "exit_code")?;
        let signal_live = profile.offset("signal_struct", "live").ok();
        let dentry_stamp = dentry_stamp(&profile);
        let bprm = (|| {
            Some(BprmOffsets {
                filename: profile.offset("linux_binprm", "filename").ok()?,
                argc: profile.offset("linux_binprm", "argc").ok()?,
                p: profile.offset("linux_binprm", "p").ok()?,
                mm: profile.offset("linux_binprm", "mm").ok()?,
            })
        })();
        let max_nr = profile.syscall_numbers.values().copied().max().unwrap_or(0);
        let mut syscalls = vec![None; usize::try_from(max_nr).unwrap_or(0) + 1];
        for (name, &nr) in &profile.syscall_numbers {
            if let Some(slot) = usize::try_from(nr).ok().and_then(|i| syscalls.get_mut(i)) {
                *slot = Some((name.clone(), path_arg(name)));
            }
        }
        let pairs_returns = probes
            .specs()
            .iter()
            .any(|s| s.kind == ProbeKind::Return(ReturnHook::Syscall));
        Ok(Self {
            mem,
            profile,
            layout,
            probes,
            pending: HashMap::new(),
            pairs_returns,
            in_exec: HashMap::new(),
            registry: Registry::new(),
            task_off,
            limits: Limits::default(),
            exit_code,
            signal_live,
            dentry_stamp,
            bprm,
            syscalls,
            lineage: Lineage::new(RunInfo::new()),
            stats: MonitorStats::default(),
        })
    }

    /// The run the events are stamped with.
    pub fn run_info(&self) -> &RunInfo {
        self.lineage.run()
    }

    /// Stamp events with `lineage` (a given run, a test's clock) from now on.
    pub fn set_lineage(&mut self, lineage: Lineage) {
        self.lineage = lineage;
    }

    /// The ornaments.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The ornaments, to attach or detach.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The probes this monitor handles.
    pub fn probes(&self) -> &ProbeSet {
        &self.probes
    }

    /// Counters.
    pub fn stats(&self) -> MonitorStats {
        self.stats
    }

    /// Tell the ornaments the run is over.
    pub fn finish(&mut self) {
        self.registry.finish();
    }

    /// Handle one hit: read the task, build the event, deliver it, return the action.
    pub fn on_hit(&mut self, hit: &ProbeHit) -> HitOutcome {
        self.stats.hits += 1;
        let Some((kind, window)) = self.probes.get(hit.probe).map(|s| (s.kind, s.window)) else {
            self.stats.unknown_probe += 1;
            tracing::debug!(probe = ?hit.probe, "hit of a probe not in the set");
            return HitOutcome::nothing();
        };
        let close = self.exec_window(kind, window, hit);
        // None: the hit is filtered out (not a watched syscall, not a setid).
        let built = self
            .probes
            .get(hit.probe)
            .and_then(|spec| self.build(spec, hit));
        let Some(Built {
            mut ev,
            no_current,
            task,
        }) = built
        else {
            self.stats.filtered += 1;
            return HitOutcome {
                close,
                ..HitOutcome::nothing()
            };
        };
        if no_current {
            self.stats.no_current += 1;
        }
        // A task that exits inside a watched syscall: it never returns, said before its exit.
        let never_returned = self.pair(&mut ev, task);
        let mut events = Vec::new();
        if let Some(mut ret) = never_returned {
            self.stats.events += 1;
            self.lineage.stamp(&mut ret);
            // Nothing to decide: the task is already exiting.
            let _ = self.registry.dispatch(&ret);
            events.push(ret);
        }
        self.stats.events += 1;
        self.lineage.stamp(&mut ev);
        let d = self.registry.dispatch(&ev);
        let action = d.action();
        if !hit.held && action != Action::Continue {
            tracing::debug!(probe = ?hit.probe, ?action, "action on a hit that was not held");
        }
        if ev.is_reported() {
            events.push(ev);
        }
        HitOutcome {
            events,
            action,
            pause: d.pause_requested(),
            close,
        }
    }

    /// `current->signal`'s `flags` and `group_exit_code` at a `do_group_exit` hit: read at
    /// the hit, else now.
    fn group_exit(
        &self,
        vm: &VirtMem<'_>,
        hit: &ProbeHit,
        current: Option<Gva>,
    ) -> Option<(u32, u32)> {
        if let (Some(f), Some(c)) = (hit.mem[MEM_KILL_FLAGS], hit.mem[MEM_KILL_GROUP_CODE]) {
            return Some((low32(f), low32(c)));
        }
        let off = |f: &str| self.profile.offset("signal_struct", f).ok();
        let sig = vm
            .read_u64(current?.wrapping_add(self.task_off.signal))
            .ok()
            .map(Gva)
            .filter(|s| is_kernel_address(*s))?;
        let flags = vm.read_u32(sig.wrapping_add(off("flags")?)).ok()?;
        let code = vm
            .read_u32(sig.wrapping_add(off("group_exit_code")?))
            .ok()?;
        Some((flags, code))
    }

    /// True unless the dentry at `d` now reads differently from the stamps the hit carries
    /// (its name hash and parent at the hit): then it was freed and reused since, and its
    /// path is not the executable's. A stamp the hit does not carry is not checked.
    fn same_dentry(&self, vm: &VirtMem<'_>, d: Gva, hit: &ProbeHit, slots: [usize; 2]) -> bool {
        let Some((hash, parent)) = self.dentry_stamp else {
            return true;
        };
        let at_hit = |i: usize| hit.mem.get(i).copied().flatten();
        let hash_ok = at_hit(slots[0])
            .is_none_or(|h| vm.read_u32(d.wrapping_add(hash)).ok() == Some(low32(h)));
        let parent_ok =
            at_hit(slots[1]).is_none_or(|p| vm.read_u64(d.wrapping_add(parent)).ok() == Some(p));
        hash_ok && parent_ok
    }

    fn build(&self, spec: &ArmSpec, hit: &ProbeHit) -> Option<Built> {
        let kernel = Kernel::new(&*self.mem, &self.profile, self.layout);
        let reader = TaskReader::from_offsets(&kernel, self.task_off, self.limits);
        // Uncached: a hit reads a few dozen words, fewer than a translation cache costs
        // to set up.
        let vm = VirtMem::new(
            &*self.mem,
            PageRoot::kernel_from_cr3(hit.regs.cr3, hit.regs.cr4),
        );
        let (current, current_at_hit) = current_task(&kernel, &vm, hit);
        let r = Reader {
            reader: &reader,
            vm: &vm,
            hit,
            euid_at_hit: !matches!(spec.kind, ProbeKind::Exec(_)),
        };
        let arg = |v: u64| Some(Gva(v)).filter(|&g| is_kernel_address(g));
        let task_arg = arg(hit.regs.rdi).or(current);
        let no_current = current.is_none();
        // The task the event is about: rdi's for exit at `proc_exit_connector` (the
        // exiting task), else the current one.
        let about = match spec.kind {
            ProbeKind::Exit(ExitHook::ProcExitConnector) => task_arg,
            _ => current,
        };
        // A value read at the hit, for reads based on the task the event is about.
        let at_hit = |based_here: bool, i: usize| {
            based_here
                .then(|| hit.mem.get(i).copied().flatten())
                .flatten()
        };
        let ev = match spec.kind {
            ProbeKind::Fork(_) => {
                let child = arg(hit.regs.rdi);
                let m = |i| at_hit(child.is_some(), i);
                let field = |f: &dyn Fn(Gva) -> Option<i32>| child.and_then(f);
                let child_pid = m(MEM_CHILD_PID)
                    .map(low32_signed)
                    .or_else(|| field(&|c| reader.pid(&vm, c).ok()));
                let child_tgid = m(MEM_CHILD_TGID)
                    .map(low32_signed)
                    .or_else(|| field(&|c| reader.tgid(&vm, c).ok()));
                // As TaskReader::is_kernel_thread: PF_KTHREAD, or no mm.
                // (A non-NULL mm that is not a kernel address reads as "not a kernel thread".)
                let kthread = match (m(MEM_CHILD_FLAGS), m(MEM_CHILD_MM)) {
                    (Some(f), _) if low32(f) & PF_KTHREAD != 0 => Some(true),
                    (Some(_), Some(mm)) => Some(mm == 0),
                    _ => child.and_then(|c| reader.is_kernel_thread(&vm, c).ok()),
                };
                Event::Fork(ForkEvent {
                    task: r.header_at_hit(current, current_at_hit.is_some()),
                    child_pid,
                    child_tgid,
                    thread: matches!((child_pid, child_tgid), (Some(p), Some(t)) if p != t),
                    kernel_thread: kthread.unwrap_or(false),
                    // Stamped with the rest by the lineage.
                    child_exec_id: None,
                })
            }
            ProbeKind::Exec(ExecHook::ProcExecConnector) => {
                // Reads at the hit are based on rdi: only for the task rdi names.
                let here = arg(hit.regs.rdi).is_some();
                let m = |i| at_hit(here, i);
                let mut ev = ExecEvent {
                    task: r.header_at_hit(task_arg, here),
                    ..ExecEvent::default()
                };
                if let Some(t) = task_arg {
                    // The executable: its dentry as read at the hit (a NULL mm or exe_file
                    // means none), its path read now; else everything from memory now.
                    let mm = kptr_at_hit(m(MEM_EXEC_MM));
                    ev.filename = match (mm, kptr_at_hit(m(MEM_EXEC_EXE_FILE))) {
                        (Some(None), _) | (Some(Some(_)), Some(None)) => None,
                        (Some(Some(_)), Some(Some(file))) => {
                            match kptr_at_hit(m(MEM_EXEC_DENTRY)) {
                                // The file's mount is read now, from the file that still
                                // names that dentry.
                                Some(Some(d)) if self.same_dentry(&vm, d, hit, EXE_STAMP) => {
                                    reader.path_of_file_at(&vm, file, d).ok()
                                }
                                _ => None,
                            }
                        }
                        _ => reader.exe_path(&vm, t).ok().flatten(),
                    };
                    // The working directory: its mount and dentry as read at the hit (a
                    // NULL fs means none), its path read now; else all from memory now.
                    ev.cwd = match kptr_at_hit(m(MEM_EXEC_FS)) {
                        Some(None) => None,
                        Some(Some(_)) => match (
                            kptr_at_hit(m(MEM_EXEC_PWD_MNT)),
                            kptr_at_hit(m(MEM_EXEC_PWD_DENTRY)),
                        ) {
                            (Some(Some(mnt)), Some(Some(d)))
                                if self.same_dentry(&vm, d, hit, PWD_STAMP) =>
                            {
                                reader.file_path(&vm, mnt, d).ok()
                            }
                            _ => None,
                        },
                        None => reader.cwd(&vm, t).ok().flatten(),
                    };
                    // The command line: the bytes read at the hit, else from memory now.
                    let argv = match (mm, &hit.bytes) {
                        (Some(None), _) => Ok(None),
                        (Some(Some(_)), Some(b)) if here => {
                            if b.data.is_empty() && !b.complete {
                                // Its first page was unreadable, as `TaskReader::argv` says.
                                Err(())
                            } else {
                                Ok(Some(Argv::from_bytes(&b.data, !b.complete)))
                            }
                        }
                        _ => reader.argv(&vm, t).map_err(|_| ()),
                    };
                    match argv {
                        Ok(Some(a)) => {
                            ev.argv_truncated = a.truncated || a.args.len() > MAX_ARGV_ENTRIES;
                            ev.argv = a.args;
                            ev.argv.truncate(MAX_ARGV_ENTRIES);
                        }
                        Ok(None) => {}
                        Err(()) => ev.argv_truncated = true,
                    }
                }
                Event::Exec(ev)
            }
            ProbeKind::Exec(ExecHook::BeginNewExec) => {
                Event::Exec(r.exec_from_bprm(self.bprm, arg(hit.regs.rdi), current))
            }
            ProbeKind::Exit(hook) => {
                // Reads at the hit are based on rdi: only for the task rdi names.
                let here = hook == ExitHook::ProcExitConnector && arg(hit.regs.rdi).is_some();
                let m = |i| at_hit(here, i);
                let (task, code) = match hook {
                    ExitHook::ProcExitConnector => (
                        task_arg,
                        m(MEM_EXIT_CODE).map(low32).or_else(|| {
                            task_arg.and_then(|t| vm.read_u32(t.wrapping_add(self.exit_code)).ok())
                        }),
                    ),
                    // `long code`: the status is its low 32 bits.
                    ExitHook::DoExit => (current, Some(low32(hit.regs.rdi))),
                };
                let header = r.header_at_hit(task, here);
                let code = code.unwrap_or(0);
                let sig = u8::try_from(code & 0x7f).unwrap_or(0);
                let leader = header.pid.is_some() && header.pid == header.tgid;
                let live_at_hit = match kptr_at_hit(m(MEM_EXIT_SIGNAL)) {
                    Some(Some(_)) => m(MEM_EXIT_LIVE).map(|n| Some(low32_signed(n))),
                    Some(None) => Some(None),
                    None => None,
                };
                let group_exit = match (self.signal_live, task) {
                    (Some(live), Some(t)) => live_at_hit
                        .unwrap_or_else(|| {
                            reader
                                .signal_struct(&vm, t)
                                .ok()
                                .and_then(|s| vm.read_i32(s.wrapping_add(live)).ok())
                        })
                        .map_or(leader, |n| match hook {
                            ExitHook::ProcExitConnector => n == 0,
                            ExitHook::DoExit => n <= 1,
                        }),
                    _ => leader,
                };
                Event::Exit(ExitEvent {
                    task: header,
                    exit_code: u8::try_from((code >> 8) & 0xff).unwrap_or(0),
                    signal: (sig != 0).then_some(sig),
                    core_dumped: code & 0x80 != 0,
                    group_exit,
                })
            }
            ProbeKind::Syscall(hook) => {
                let nr = match hook {
                    SyscallHook::Function { nr } => nr,
                    SyscallHook::DoSyscall64 => {
                        // `int nr`, sign-extended into rsi.
                        let nr = low32(hit.regs.rsi);
                        if i32::try_from(nr).is_err()
                            || spec
                                .syscall_filter
                                .as_ref()
                                .is_some_and(|f| !f.contains(&nr))
                        {
                            return None;
                        }
                        nr
                    }
                };
                // Arguments read at the hit (exact even when the vCPU ran on), else
                // from pt_regs now (exact when the vCPU is held).
                let at_hit: Option<Vec<u64>> = hit.mem[MEM_SYSCALL_ARGS].iter().copied().collect();
                let args = at_hit
                    .and_then(|v| <[u64; 6]>::try_from(v).ok())
                    .or_else(|| {
                        arg(hit.regs.rdi)
                            .and_then(|p| reader.regs_at(&vm, p).ok())
                            .or_else(|| current.and_then(|c| reader.user_regs(&vm, c).ok()))
                            .map(|u| u.syscall_args())
                    })
                    .unwrap_or_default();
                let known = usize::try_from(nr)
                    .ok()
                    .and_then(|i| self.syscalls.get(i))
                    .and_then(Option::as_ref);
                let path = known
                    .and_then(|(_, i)| *i)
                    .zip(current)
                    .and_then(|(i, c)| r.user_string(c, args[i]));
                Event::Syscall(SyscallEvent {
                    // The header read at the hit when the engine did (of the task
                    // current at the hit), else read now.
                    task: r.header_at_hit(current, current_at_hit.is_some()),
                    nr,
                    name: known.map(|(n, _)| n.clone()),
                    args,
                    path,
                    denied: None,
                    reported: self.probes.reports_syscall(nr),
                })
            }
            ProbeKind::Return(hook) => {
                let name_of = |nr: u32| {
                    usize::try_from(nr)
                        .ok()
                        .and_then(|i| self.syscalls.get(i))
                        .and_then(Option::as_ref)
                        .map(|(n, _)| n.clone())
                };
                let header = r.header_at_hit(current, current_at_hit.is_some());
                returns::build(&r, hook, spec, header, current, name_of)?
            }
            // Bookkeeping only (the exec window).
            ProbeKind::ExecAttempt => return None,
            ProbeKind::Signal(hook) => {
                // `ksig->sig` for a handler: read at the hit, else now (held).
                let ksig_sig = hit.mem[0].or_else(|| {
                    let off = self.profile.offset("ksignal", "sig").ok()?;
                    arg(hit.regs.rsi)
                        .and_then(|k| vm.read_u32(k.wrapping_add(off)).ok())
                        .map(u64::from)
                });
                let at_hit = current_at_hit.is_some();
                // For a death: the group's exit state, read at the hit, else now.
                let group = match hook {
                    SignalHook::Kill => self.group_exit(&vm, hit, current),
                    _ => None,
                };
                let extra = signal::Extra { ksig_sig, group };
                signal::build(&r, hook, r.header_at_hit(current, at_hit), extra)?
            }
            ProbeKind::Setid => {
                let changed = match hit.regs.rsi & 0xffff_ffff {
                    PROC_EVENT_UID => IdChange::Uid,
                    PROC_EVENT_GID => IdChange::Gid,
                    _ => return None,
                };
                Event::Setid(SetidEvent {
                    task: r.header(task_arg),
                    changed,
                })
            }
        };
        Some(Built {
            ev,
            no_current,
            task: about,
        })
    }
}

/// The task current at `hit`: (the one the engine read at the hit, else the one current
/// now; the one read at the hit).
fn current_task(
    kernel: &Kernel<'_>,
    vm: &VirtMem<'_>,
    hit: &ProbeHit,
) -> (Option<Gva>, Option<Gva>) {
    // As Kernel::current_task_on, through the uncached `vm`.
    let base = match kernel.percpu_base(&hit.regs) {
        Ok(b) => Some(b),
        Err(KernelError::NoPerCpuBase { .. }) => kernel.percpu_base_of_cpu(hit.vcpu).ok(),
        Err(_) => None,
    };
    let at_hit = hit
        .mem
        .get(MEM_CURRENT_TASK)
        .copied()
        .flatten()
        .map(Gva)
        .filter(|t| crate::kernel::is_kernel_address(*t));
    let current = at_hit.or_else(|| base.and_then(|b| kernel.current_task_at(vm, b).ok()));
    (current, at_hit)
}

#[cfg(test)]
mod tests;
