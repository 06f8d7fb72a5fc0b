//! Syscall returns: the `syscall_return` and `exec_failed` events read at
//! `syscall_exit_to_user_mode(regs)`, the pairing of watched syscalls' entries with their
//! returns (by task), and the tasks inside an exec (whose window the engine keeps open).

use super::reader::Reader;
use super::{current_task, Monitor};
use crate::event::{errno_text, Event, ExecFailedEvent, SyscallReturnEvent, TaskHeader};
use crate::kernel::{is_kernel_address, Kernel};
use crate::paging::PageRoot;
use crate::probes::{ArmSpec, ExitHook, ProbeKind, ReturnHook, MEM_RET_AX, MEM_RET_ORIG_AX};
use crate::vmem::VirtMem;
use ornament_engine::wire::Window;
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

/// The event of a return probe's hit (`task`: the header of the task current there);
/// `None` for a number outside the probe's filter (an engine that cannot filter delivers
/// every hit), `orig_ax` -1 (a return from a signal handler: no syscall), or an exec that
/// succeeded (that is the exec event's).
pub(super) fn build(
    r: &Reader<'_, '_, '_>,
    hook: ReturnHook,
    spec: &ArmSpec,
    task: TaskHeader,
    current: Option<Gva>,
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
        ReturnHook::Exec | ReturnHook::ExecAt => {
            let errno = errno?;
            let syscall = name.unwrap_or_else(|| format!("#{nr}"));
            // The file name (execve(filename, ...), execveat(dirfd, filename, ...)): the
            // bytes the probe read at the hit; else (an engine without reads at the hit)
            // from the caller's pt_regs and memory now.
            let at_hit = hit.bytes.as_ref().and_then(|b| {
                let end = b.data.iter().position(|&c| c == 0)?;
                Some(crate::guest_text::decode(&b.data[..end]))
            });
            let filename = at_hit.or_else(|| {
                let i = usize::from(hook == ReturnHook::ExecAt);
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
    /// Follow the tasks inside an exec: an attempt's entry opens its window (the engine
    /// arms the return probe, [`Window::Opens`]), the return closes it (the engine again),
    /// and a task that exits inside never returns: its part is closed here, the window to
    /// close returned for the session to tell the engine.
    pub(super) fn exec_window(
        &mut self,
        kind: ProbeKind,
        window: Window,
        hit: &ProbeHit,
    ) -> Vec<ProbeId> {
        let opens = match (kind, window) {
            (ProbeKind::ExecAttempt, Window::Opens(w)) => Some(ProbeId(w)),
            _ => None,
        };
        // Only an exec's return or an exit can close: a watched syscall's return (every
        // one, while some exec is in flight) reads no task here.
        let closes = matches!(
            kind,
            ProbeKind::Return(ReturnHook::Exec | ReturnHook::ExecAt) | ProbeKind::Exit(_)
        );
        if opens.is_none() && (!closes || self.in_exec.is_empty()) {
            return Vec::new();
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
            return Vec::new();
        };
        match (opens, kind) {
            // Bounded by the guest's tasks: each is in at most once.
            (Some(w), _) => {
                self.in_exec.insert(task, w);
            }
            (None, ProbeKind::Return(ReturnHook::Exec | ReturnHook::ExecAt)) => {
                self.in_exec.remove(&task);
            }
            (None, ProbeKind::Exit(_)) => {
                if let Some(w) = self.in_exec.remove(&task) {
                    return vec![w];
                }
            }
            _ => {}
        }
        Vec::new()
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
