//! What the session asks each engine to arm: one [`ProbeRequest`] per probe of the
//! [`ProbeSet`], with the registers and memory to capture at a hit, and whether the vCPU
//! must be held (to read what changes once it runs on, or to act at the hit).

use crate::kaslr::KernelLayout;
use crate::probes::{
    captured_at_hit, filter_on, hit_bytes, hit_reads, ArmSpec, ProbeKind, ProbeSet, SyscallHook,
};
use crate::profile::{Profile, ProfileError};
use ornament_engine::wire::{ProbeSpec, Reg, RegMask};
use ornament_engine::{Capabilities, DenyAt, DenyOffsets, ProbeRequest};

/// `SYSCALL_WORK_BIT_SYSCALL_EMU` of `enum syscall_work_bit` (include/linux/thread_info.h,
/// unchanged since 5.11): setting it makes `syscall_trace_enter` skip the syscall.
pub const SYSCALL_WORK_BIT_SYSCALL_EMU: u32 = 3;

/// The kernel facts a [`DenyAt::Dispatcher`] engine needs, from the profile.
pub fn deny_offsets(profile: &Profile, layout: KernelLayout) -> Result<DenyOffsets, ProfileError> {
    let cur = &profile.percpu_current_task;
    Ok(DenyOffsets {
        syscall_exit: layout.virt(profile.symbol("syscall_exit_to_user_mode")?),
        current_task_offset: cur.symbol_offset.wrapping_add(cur.field_offset),
        syscall_work_offset: profile.offset("task_struct", "thread_info.syscall_work")?,
        syscall_emu_bit: SYSCALL_WORK_BIT_SYSCALL_EMU,
        pt_regs_ax_offset: profile.offset("pt_regs", "ax")?,
    })
}

/// The request for one probe. Each reads only the registers the monitor uses for its kind
/// (rdi, the hook's argument; gs_base, the per-CPU area; cr3 and cr4, the page tables the
/// task is read through; rsi where the hook has a second argument) and the memory reads of
/// [`hit_reads`] (with exec's command line, [`hit_bytes`]). Of the probes the set holds
/// (lifecycle hooks; syscalls only for deny or `hold_syscalls`), those whose event is
/// complete from those reads ([`captured_at_hit`]) do not, unless an ornament acts at exec
/// (`exec_acts`); `exit`/`exit_group` always hold (the task is read before it can be
/// reaped). Engines without captures hold every hit anyway.
pub fn request(
    spec: &ArmSpec,
    probes: &ProbeSet,
    profile: &Profile,
    caps: Capabilities,
    exec_acts: bool,
) -> Result<ProbeRequest, ProfileError> {
    let second = matches!(
        spec.kind,
        ProbeKind::Syscall(SyscallHook::DoSyscall64) | ProbeKind::Setid
    );
    let mut regs = RegMask::of(&[Reg::Rdi, Reg::GsBase, Reg::Cr3, Reg::Cr4]);
    if second {
        regs = RegMask(regs.0 | RegMask::of(&[Reg::Rsi]).0);
    }
    if let ProbeKind::Signal(_) = spec.kind {
        // sig, info (or ksig), the target task and the pid type.
        regs = RegMask(regs.0 | RegMask::of(&[Reg::Rsi, Reg::Rdx, Reg::Rcx]).0);
    }
    let mut capture = ProbeSpec::regs(regs);
    // Syscall arguments (pt_regs is overwritten at the task's next syscall), the current
    // task, and for fork, exec and exit everything the event reports.
    capture.mem = hit_reads(spec.kind, profile)?;
    capture.bytes = hit_bytes(spec.kind);
    let acts = exec_acts && matches!(spec.kind, ProbeKind::Exec(_));
    let mut hold = spec.hold && (acts || !captured_at_hit(spec.kind));
    if let ProbeKind::Syscall(SyscallHook::Function { nr }) = spec.kind {
        hold |= ["exit", "exit_group"]
            .iter()
            .any(|n| profile.syscall_nr(n) == Some(nr));
    }
    if let Some(f) = &spec.syscall_filter {
        let nrs: Vec<u64> = f.iter().map(|&n| u64::from(n)).collect();
        capture = capture.with_filter_on(filter_on(spec.kind), &nrs);
    }
    capture.hold = hold;
    capture.window = spec.window;
    let denies = !probes.deniable().is_empty() && spec.hold;
    let deny = denies
        && match (caps.deny_at, spec.kind) {
            (DenyAt::Dispatcher, ProbeKind::Syscall(SyscallHook::DoSyscall64)) => true,
            (DenyAt::FunctionEntry, ProbeKind::Syscall(SyscallHook::Function { nr })) => {
                probes.deniable().contains(&nr)
            }
            _ => false,
        };
    Ok(ProbeRequest {
        id: spec.id,
        at: spec.at,
        symbol: spec.symbol.clone(),
        capture,
        deny,
    })
}
