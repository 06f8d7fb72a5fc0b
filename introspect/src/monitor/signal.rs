//! Signal events from their hooks: generation at `__send_signal_locked` (the sender is
//! current, the target task in rdx, the siginfo in rsi) and delivery at
//! `signal_setup_done` (a handler), `do_signal_stop` (a stop) and `do_group_exit` with a
//! signal in its code (death by the signal's default action).

use super::reader::{low32, low32_signed, Reader};
use crate::event::{
    signal_name, Event, SignalAction, SignalDeliverEvent, SignalEvent, SignalOrigin, SignalScope,
    TaskHeader,
};
use crate::probes::{
    SignalHook, MEM_SIG_CODE, MEM_SIG_FIELDS, MEM_SIG_TARGET_COMM, MEM_SIG_TARGET_PID,
    MEM_SIG_TARGET_TGID, SIGINFO_CODE, SIGINFO_FIELDS,
};
use ornament_engine::Gva;

/// `SEND_SIG_NOINFO` and `SEND_SIG_PRIV`: siginfo pointers that mean "made up by the kernel"
/// (`SI_USER` from current, `SI_KERNEL`).
const SEND_SIG_NOINFO: u64 = 0;
const SEND_SIG_PRIV: u64 = 1;
/// `SI_USER` and `SI_KERNEL`.
const SI_USER: i32 = 0;
const SI_KERNEL: i32 = 0x80;
/// Signals whose kernel-made siginfo carries a fault address.
const FAULT_SIGNALS: [i32; 5] = [4, 5, 7, 8, 11];
/// Real signal numbers: 1..=64 (`_NSIG`).
const NSIG: i32 = 64;
/// `SIGNAL_GROUP_EXIT` in `signal_struct.flags` (include/linux/sched/signal.h): the thread
/// group is dying, of `group_exit_code`.
const SIGNAL_GROUP_EXIT: u32 = 0x4;

/// What a hook's event needs beside the registers and the header.
pub(super) struct Extra {
    /// `ksig->sig` at `signal_setup_done`.
    pub(super) ksig_sig: Option<u64>,
    /// `current->signal`'s `flags` and `group_exit_code` at `do_group_exit`.
    pub(super) group: Option<(u32, u32)>,
}

/// The event of a signal hook's hit; `None` for a `do_group_exit` without a signal (an
/// `exit_group`), or a number outside 1..=64.
pub(super) fn build(
    r: &Reader<'_, '_, '_>,
    hook: SignalHook,
    header: TaskHeader,
    extra: Extra,
) -> Option<Event> {
    let hit = r.hit;
    let m = |i: usize| hit.mem.get(i).copied().flatten();
    let deliver = |signal: i32, action| {
        (1..=NSIG).contains(&signal).then(|| {
            Event::SignalDeliver(SignalDeliverEvent {
                task: header.clone(),
                signal,
                signal_name: signal_name(signal),
                action,
            })
        })
    };
    match hook {
        SignalHook::SendLocked | SignalHook::SendLockedOuter => {
            let signal = low32_signed(hit.regs.rdi);
            if !(1..=NSIG).contains(&signal) {
                return None;
            }
            let info = hit.regs.rsi;
            let target = Some(Gva(hit.regs.rdx)).filter(|&t| crate::kernel::is_kernel_address(t));
            let field = |i: usize, read: &dyn Fn(Gva) -> Option<i32>| {
                m(i).map(low32_signed).or_else(|| target.and_then(read))
            };
            let target_pid = field(MEM_SIG_TARGET_PID, &|t| r.reader.pid(r.vm, t).ok());
            let target_tgid = field(MEM_SIG_TARGET_TGID, &|t| r.reader.tgid(r.vm, t).ok());
            let target_comm = r
                .comm_at_hit(m(MEM_SIG_TARGET_COMM[0]), m(MEM_SIG_TARGET_COMM[1]))
                .or_else(|| target.and_then(|t| r.reader.comm(r.vm, t).ok()));
            let info_at = |off: u64, at_hit: Option<u64>, len: usize| {
                at_hit.or_else(|| {
                    let a = Gva(info.wrapping_add(off));
                    match len {
                        4 => r.vm.read_u32(a).ok().map(u64::from),
                        _ => r.vm.read_u64(a).ok(),
                    }
                })
            };
            let (code, fields) = match info {
                SEND_SIG_NOINFO => (Some(SI_USER), None),
                SEND_SIG_PRIV => (Some(SI_KERNEL), None),
                _ => (
                    info_at(SIGINFO_CODE, m(MEM_SIG_CODE), 4).map(low32_signed),
                    info_at(SIGINFO_FIELDS, m(MEM_SIG_FIELDS), 8),
                ),
            };
            // A siginfo the kernel made up (SIGPIPE from a write, ...) is the kernel's, though
            // the target sees SI_USER from itself for NOINFO.
            let origin = match (info, code) {
                (SEND_SIG_NOINFO | SEND_SIG_PRIV, _) => SignalOrigin::Kernel,
                (_, Some(c)) if c <= 0 => SignalOrigin::Task,
                _ => SignalOrigin::Kernel,
            };
            let addr = match (origin, code) {
                (SignalOrigin::Kernel, Some(c)) if c > 0 && FAULT_SIGNALS.contains(&signal) => {
                    fields
                }
                _ => None,
            };
            // si_pid, the low half of the union's first 8 bytes (NOINFO: the kernel fills in
            // current's tgid, as the target will see it).
            let sender_pid = match (origin, info) {
                (_, SEND_SIG_NOINFO) => header.tgid,
                (SignalOrigin::Task, _) => fields.map(low32_signed),
                _ => None,
            };
            let scope = match hit.regs.rcx & 0xffff_ffff {
                0 => Some(SignalScope::Thread),
                1 => Some(SignalScope::Process),
                2 => Some(SignalScope::ProcessGroup),
                3 => Some(SignalScope::Session),
                _ => None,
            };
            Some(Event::Signal(SignalEvent {
                task: header,
                signal,
                signal_name: signal_name(signal),
                code,
                origin,
                target_pid,
                target_tgid,
                target_comm,
                scope,
                addr,
                sender_pid,
            }))
        }
        SignalHook::Handler => {
            let signal = extra.ksig_sig.map(low32_signed)?;
            let action = if low32(hit.regs.rdi) == 0 {
                SignalAction::Handler
            } else {
                SignalAction::HandlerFailed
            };
            deliver(signal, action)
        }
        SignalHook::Stop => deliver(low32_signed(hit.regs.rdi), SignalAction::Stop),
        // `do_group_exit(ksig->info.si_signo)` from get_signal; an `exit_group(status)`
        // passes `(status & 0xff) << 8`, whose low 7 bits are 0. A group already dying
        // (a fatal signal turned into SIGKILL for every thread by complete_signal) dies of
        // its `group_exit_code`, whatever the argument says.
        SignalHook::Kill => {
            let code = match extra.group {
                Some((flags, code)) if flags & SIGNAL_GROUP_EXIT != 0 => code,
                _ => low32(hit.regs.rdi),
            };
            deliver(i32::try_from(code & 0x7f).unwrap_or(0), SignalAction::Kill)
        }
    }
}
