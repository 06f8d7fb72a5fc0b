//! Syscall returns: the `syscall_return` and `exec_failed` events read at
//! `syscall_exit_to_user_mode(regs)`, the pairing of watched syscalls' entries with their
//! returns (by task), and the window in which the failed-exec return probe is armed.

use super::reader::Reader;
use super::{current_task, Monitor};
use crate::event::{errno_text, Event, ExecFailedEvent, SyscallReturnEvent, TaskHeader};
use crate::kernel::{is_kernel_address, Kernel};
use crate::paging::PageRoot;
use crate::probes::{ArmSpec, ExitHook, ProbeKind, ReturnHook, MEM_RET_AX, MEM_RET_ORIG_AX};
use crate::task::TaskReader;
use crate::vmem::VirtMem;
use ornament_engine::{Gva, ProbeHit, ProbeId};

/// Most watched syscalls in flight (one per task) remembered to pair with their returns.
pub const MAX_PENDING_CALLS: usize = 1 << 16;

/// A watched syscall a task entered and has not returned from.
#[derive(Debug, Clone)]
pub(super) struct PendingCall {
    nr: u32,
    name: Option<String>,
    time_ns: u64,
}

/// The event of a return probe's hit (`task`: the header of the task current there;
/// `exec_file`: for an exec's return, the file name its attempt passed, when the attempt
/// was seen); `None` for a number outside the probe's filter (an engine that cannot filter
/// delivers every hit), `orig_ax` -1 (a return from a signal handler: no syscall), or an
/// exec that succeeded (that is the exec event's).
pub(super) fn build(
    r: &Reader<'_, '_, '_>,
    hook: ReturnHook,
    spec: &ArmSpec,
    task: TaskHeader,
    current: Option<Gva>,
    exec_file: Option<Option<String>>,
    name_of: impl Fn(u32) -> Option<String>,
) -> Option<Event> {
    let hit = r.hit;
    let regs = Some(Gva(hit.regs.rdi)).filter(|&g| is_kernel_address(g));
    let regs_now = || regs.and_then(|p| r.reader.regs_at(r.vm, p).ok());
    let (ax, orig_ax) = match (hit.mem[MEM_RET_AX], hit.mem[MEM_RET_ORIG_AX]) {
        (Some(a), Some(o)) => (a, o),
        _ => regs_now().map(|u| (u.ax, u.orig_ax))?,
    };
    let nr = u32::try_from(orig_ax).ok()?;
    if spec
        .syscall_filter
        .as_ref()
        .is_some_and(|f| !f.contains(&nr))
    {
        return None;
    }
    // The register's bits as the signed long the syscall returned.
    let ret = i64::from_ne_bytes(ax.to_ne_bytes());
    let errno = (-4095..=-1)
        .contains(&ret)
        .then(|| i32::try_from(-ret).unwrap_or(0));
    let name = name_of(nr);
    Some(match hook {
        ReturnHook::Syscall => Event::SyscallReturn(SyscallReturnEvent {
            task,
            nr,
            name,
            ret: Some(ret),
            errno: errno.map(errno_text),
            entry_time_ns: None,
        }),
        ReturnHook::Exec => {
            let errno = errno?;
            let syscall = name.unwrap_or_else(|| format!("#{nr}"));
            // execve(filename, ...): the bytes the probe read at the hit, at regs->di.
            // Else (execveat(dirfd, filename, ...), or an engine without reads at the hit)
            // what the attempt read, held; else memory now.
            let at_hit = (syscall == "execve")
                .then_some(hit.bytes.as_ref())
                .flatten()
                .and_then(|b| {
                    let end = b.data.iter().position(|&c| c == 0)?;
                    Some(crate::guest_text::decode(&b.data[..end]))
                });
            let filename = at_hit.or(exec_file.flatten()).or_else(|| {
                let i = usize::from(syscall == "execveat");
                regs_now()
                    .map(|u| u.syscall_args()[i])
                    .zip(current)
                    .and_then(|(p, c)| r.user_string(c, p))
            });
            Event::ExecFailed(ExecFailedEvent {
                task,
                syscall,
                filename,
                errno,
                errno_name: errno_text(errno),
            })
        }
    })
}

impl Monitor {
    /// Keep the failed-exec return probe armed while some task is inside an exec: an
    /// attempt's entry (held) opens the window (arming the probe when it was closed) and
    /// records the file name the attempt passes; the return or the exit of the last task
    /// inside closes it, a return taking its task's file name into `exec_file` for its
    /// event. (probes to arm, probes to disarm).
    pub(super) fn exec_window(
        &mut self,
        kind: ProbeKind,
        hit: &ProbeHit,
    ) -> (Vec<ProbeId>, Vec<ProbeId>) {
        let none = (Vec::new(), Vec::new());
        let Some(window) = self.exec_window else {
            return none;
        };
        let opens = kind == ProbeKind::ExecAttempt;
        let closes = matches!(
            kind,
            ProbeKind::Return(ReturnHook::Exec) | ProbeKind::Exit(_)
        );
        let closing = closes && !self.in_exec.is_empty();
        if !opens && !closing {
            return none;
        }
        let kernel = Kernel::new(&*self.mem, &self.profile, self.layout);
        let vm = VirtMem::new(
            &*self.mem,
            PageRoot::kernel_from_cr3(hit.regs.cr3, hit.regs.cr4),
        );
        let task = match kind {
            ProbeKind::Exit(ExitHook::ProcExitConnector) => {
                Some(Gva(hit.regs.rdi)).filter(|&t| is_kernel_address(t))
            }
            _ => current_task(&kernel, &vm, hit).0,
        };
        let Some(task) = task else {
            return none;
        };
        if opens {
            // The attempt holds its vCPU: the file name it passes is read now, from the
            // pt_regs of __x64_sys_execve(regs) (execve(filename, ...), execveat(dirfd,
            // filename, ...)). For execve the return probe's own read at the hit comes
            // first (a name in a page not yet faulted in reads only there); this one serves
            // execveat, and execve when that read failed.
            let reader = TaskReader::from_offsets(&kernel, self.task_off, self.limits);
            let r = Reader {
                reader: &reader,
                vm: &vm,
                hit,
                euid_at_hit: false,
            };
            let execveat = self.profile.syscall_nr("execveat").map(u64::from);
            let file = Some(Gva(hit.regs.rdi))
                .filter(|&g| is_kernel_address(g))
                .and_then(|p| reader.regs_at(&vm, p).ok())
                .map(|u| u.syscall_args()[usize::from(Some(u.orig_ax) == execveat)])
                .and_then(|p| r.user_string(task, p));
            let was_closed = self.in_exec.is_empty();
            // Bounded by the guest's tasks: each is in at most once.
            self.in_exec.insert(task, file);
            return (
                if was_closed { vec![window] } else { Vec::new() },
                Vec::new(),
            );
        }
        if let Some(file) = self.in_exec.remove(&task) {
            self.exec_file = Some(file);
            if self.in_exec.is_empty() {
                return (Vec::new(), vec![window]);
            }
        }
        none
    }

    /// Pair watched syscalls' entries and returns by task: an entry is remembered, a return
    /// takes its entry's time, and an exit of a task inside one gives the `syscall_return`
    /// that says it never returned (returned here, to go first).
    pub(super) fn pair(&mut self, ev: &mut Event, task: Option<Gva>) -> Option<Event> {
        if !self.pairs_returns {
            return None;
        }
        let task = task?;
        match ev {
            Event::Syscall(s) if s.reported => {
                if self.pending.len() >= MAX_PENDING_CALLS && !self.pending.contains_key(&task) {
                    self.stats.unpaired += 1;
                    return None;
                }
                self.pending.insert(
                    task,
                    PendingCall {
                        nr: s.nr,
                        name: s.name.clone(),
                        time_ns: s.task.time_ns,
                    },
                );
                None
            }
            Event::SyscallReturn(r) => {
                if let Some(p) = self.pending.remove(&task) {
                    if p.nr == r.nr {
                        r.entry_time_ns = Some(p.time_ns);
                    }
                }
                None
            }
            Event::Exit(x) => {
                let p = self.pending.remove(&task)?;
                Some(Event::SyscallReturn(SyscallReturnEvent {
                    task: x.task.clone(),
                    nr: p.nr,
                    name: p.name,
                    ret: None,
                    errno: None,
                    entry_time_ns: Some(p.time_ns),
                }))
            }
            _ => None,
        }
    }
}
