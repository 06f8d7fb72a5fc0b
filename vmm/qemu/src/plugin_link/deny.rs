//! \[1\] Denying a syscall through the plugin link. QEMU's plugin API v4 cannot write
//! registers or memory: arm a held probe at `do_syscall_64`'s first instruction with
//! [`DenyConfig::entry_spec`]. For a hit answered with
//! [`Action::DenySyscall`](ornament_engine::Action::DenySyscall), while that vCPU is held, the
//! link writes through the shared guest RAM ([`GuestRam`]):
//!
//! 1. `pt_regs->ax = -errno` (8 bytes at `rdi + pt_regs_ax_offset`; `rdi` is `do_syscall_64`'s
//!    `regs` argument; `ax` is what the syscall path returns to user space);
//! 2. atomically sets bit `syscall_emu_bit` (`SYSCALL_WORK_BIT_SYSCALL_EMU`) in the current
//!    task's `thread_info.syscall_work` (`task + syscall_work_offset`, the task read from the
//!    per-CPU `current_task` in the probe callback).
//!
//! Then `syscall_enter_from_user_mode` sees `SYSCALL_EMU`, calls `ptrace_report_syscall_entry`
//! (which returns 0 at once for an untraced task) and returns -1, so `do_syscall_64` runs no
//! syscall and leaves `ax` alone (6.1: `nr == -1` skips both the table call and the
//! `-ENOSYS` store). The link then enables a held internal probe at
//! `syscall_exit_to_user_mode` and, when the same task reaches it, clears the bit again (unless
//! it was already set before, by a real `PTRACE_SYSEMU` tracer) and disables the probe once no
//! clear is pending. Addresses are translated with a 4/5-level page walk from the hit's `cr3`.
//! Every offset comes from the caller (a kernel profile), none is a constant here.

use super::{arm_msg, translate, PluginHit, PluginLink, PluginLinkError, DENY_EXIT_PROBE};
use ornament_engine::wire::{DisarmRecord, HitRecord, Msg};
use ornament_engine::{Gpa, Gva, MemError, PhysMemory};
use std::sync::Arc;

/// Guest RAM the link may write while a vCPU is held: plain writes plus atomic bit updates
/// (on QEMU's shared RAM file, host atomics are coherent with the guest's locked operations).
pub trait GuestRam: PhysMemory {
    /// Atomically OR `bits` into the aligned `u64` at `gpa`; returns the old value.
    fn fetch_or_u64(&self, gpa: Gpa, bits: u64) -> Result<u64, MemError>;
    /// Atomically AND `mask` into the aligned `u64` at `gpa`; returns the old value.
    fn fetch_and_u64(&self, gpa: Gpa, mask: u64) -> Result<u64, MemError>;
}

/// Kernel facts a deny needs, all from the guest's profile: the engine seam's
/// [`DenyOffsets`], with the probe specs of the deny path
/// ([`DenyOffsets::entry_spec`], [`DenyOffsets::exit_spec`]).
pub use ornament_engine::DenyOffsets as DenyConfig;

#[derive(Debug, Clone, Copy)]
struct PendingClear {
    task: u64,
    work_gpa: Gpa,
    was_set: bool,
}

pub(super) struct DenyState {
    cfg: DenyConfig,
    ram: Arc<dyn GuestRam>,
    pending: Vec<PendingClear>,
}

impl std::fmt::Debug for DenyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DenyState")
            .field("cfg", &self.cfg)
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl PluginLink {
    /// Allow [`Action::DenySyscall`] answers: `ram` is the guest's shared RAM. Sends the
    /// internal `syscall_exit_to_user_mode` probe as a disabled candidate.
    pub fn enable_deny(
        &mut self,
        cfg: DenyConfig,
        ram: Arc<dyn GuestRam>,
    ) -> Result<(), PluginLinkError> {
        self.deny = Some(DenyState {
            cfg,
            ram,
            pending: Vec::new(),
        });
        self.arm_inner(DENY_EXIT_PROBE, cfg.syscall_exit, cfg.exit_spec(), false)
    }

    pub(super) fn apply_deny(
        &mut self,
        hit: &PluginHit,
        errno: i32,
    ) -> Result<(), PluginLinkError> {
        if !(1..=4095).contains(&errno) {
            return Err(PluginLinkError::BadErrno(errno));
        }
        let d = self.deny.as_mut().ok_or(PluginLinkError::DenyNotEnabled)?;
        let task = hit.mem[0].ok_or(PluginLinkError::DenyMissing(
            "the current task (memory read 0)",
        ))?;
        let r = &hit.hit.regs;
        if r.cr3 == 0 || r.rdi == 0 {
            return Err(PluginLinkError::DenyMissing("cr3 and rdi"));
        }
        let la57 = r.cr4 & ornament_engine::paging::CR4_LA57 != 0;
        let mem: &dyn PhysMemory = &*d.ram;
        let regs_ax = Gva(r.rdi).wrapping_add(d.cfg.pt_regs_ax_offset);
        let ax_gpa =
            translate(mem, r.cr3, la57, regs_ax).ok_or(PluginLinkError::Translate(regs_ax))?;
        let work = Gva(task).wrapping_add(d.cfg.syscall_work_offset);
        let work_gpa = translate(mem, r.cr3, la57, work).ok_or(PluginLinkError::Translate(work))?;
        let neg = i64::from(errno).wrapping_neg().to_le_bytes();
        d.ram.write_phys(ax_gpa, &neg)?;
        let bit = 1u64 << (d.cfg.syscall_emu_bit % 64);
        let old = d.ram.fetch_or_u64(work_gpa, bit)?;
        d.pending.push(PendingClear {
            task,
            work_gpa,
            was_set: old & bit != 0,
        });
        let first = d.pending.len() == 1;
        self.stats.denied += 1;
        if first {
            if let Some(a) = self.armed.get_mut(&DENY_EXIT_PROBE) {
                a.enabled = true;
                let a = *a;
                self.send(&arm_msg(DENY_EXIT_PROBE, &a))?;
            }
        }
        Ok(())
    }

    pub(super) fn on_exit_hit(&mut self, h: &HitRecord) -> Result<(), PluginLinkError> {
        let mut disarm = false;
        if let (Some(d), Some(task)) = (self.deny.as_mut(), h.mem(0)) {
            let bit = 1u64 << (d.cfg.syscall_emu_bit % 64);
            if let Some(pos) = d.pending.iter().position(|p| p.task == task) {
                let p = d.pending.remove(pos);
                if !p.was_set {
                    d.ram.fetch_and_u64(p.work_gpa, !bit)?;
                }
                disarm = d.pending.is_empty();
            }
        }
        if disarm {
            if let Some(a) = self.armed.get_mut(&DENY_EXIT_PROBE) {
                a.enabled = false;
            }
            self.send(&Msg::Disarm(DisarmRecord {
                probe: DENY_EXIT_PROBE.0,
            }))?;
        }
        if h.held() {
            self.resume(h.vcpu, h.seq, 0)?;
        }
        Ok(())
    }
}
