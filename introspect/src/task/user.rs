//! A task's user side: its address space, its argv, and the user registers (`pt_regs`) it
//! entered the kernel with.

use super::{at, Argv, Field, TaskReader, Unreadable, UserRegs};
use crate::paging::PagingMode;
use crate::vmem::VirtMem;
use ornament_engine::Gva;

impl TaskReader<'_> {
    /// The user address space of `mm` (through `mm->pgd` and the direct map).
    pub fn user_vm<'v>(&self, vm: &VirtMem<'v>, mm: Gva) -> Field<VirtMem<'v>> {
        let a = at(mm, self.off.mm_pgd);
        let pgd = Self::kptr_nonnull(vm, a)?;
        let mode: PagingMode = vm.root().mode;
        let root = self
            .kernel
            .root_of_pgd(pgd, mode)
            .map_err(|_| Unreadable { at: a })?;
        Ok(vm.with_root(root))
    }

    /// Command line from `mm->arg_start..arg_end`, read through the task's own tables.
    pub fn argv(&self, vm: &VirtMem<'_>, task: Gva) -> Field<Option<Argv>> {
        let Some(mm) = self.mm(vm, task)? else {
            return Ok(None);
        };
        let start_at = at(mm, self.off.mm_arg_start);
        let start = vm
            .read_u64(start_at)
            .map_err(|_| Unreadable { at: start_at })?;
        let end_at = at(mm, self.off.mm_arg_end);
        let end = vm.read_u64(end_at).map_err(|_| Unreadable { at: end_at })?;
        let len = end.checked_sub(start).ok_or(Unreadable { at: end_at })?;
        let mut truncated = len > self.limits.max_argv_bytes;
        let want = len.min(self.limits.max_argv_bytes);
        let uvm = self.user_vm(vm, mm)?;
        let mut bytes = vec![0u8; usize::try_from(want).unwrap_or(0)];
        // Read page by page; keep what was readable before the first hole.
        let mut got = 0usize;
        while got < bytes.len() {
            let a = Gva(start).wrapping_add(got as u64);
            let in_page = 4096 - usize::try_from(a.raw() & 0xfff).unwrap_or(0);
            let n = in_page.min(bytes.len() - got);
            if uvm.read(a, &mut bytes[got..got + n]).is_err() {
                if got == 0 {
                    return Err(Unreadable { at: a });
                }
                truncated = true;
                break;
            }
            got += n;
        }
        bytes.truncate(got);
        Ok(Some(Argv::from_bytes(&bytes, truncated)))
    }

    /// Address of the task's user-mode registers: `pt_regs` at the top of its kernel
    /// stack (`task->stack + THREAD_SIZE - sizeof(pt_regs)`).
    pub fn user_regs_addr(&self, vm: &VirtMem<'_>, task: Gva) -> Field<Gva> {
        let stack = Self::kptr_nonnull(vm, at(task, self.off.stack))?;
        Ok(stack
            .wrapping_add(self.off.thread_size)
            .wrapping_sub(self.off.pt_regs_size))
    }

    /// The user-mode registers saved at the top of the task's kernel stack (meaningful
    /// while the task is in the kernel on behalf of user space: syscalls, faults).
    pub fn user_regs(&self, vm: &VirtMem<'_>, task: Gva) -> Field<UserRegs> {
        let base = self.user_regs_addr(vm, task)?;
        self.regs_at(vm, base)
    }

    /// A `struct pt_regs` at `base` (e.g. the argument of `__x64_sys_*` or
    /// `do_syscall_64`).
    pub fn regs_at(&self, vm: &VirtMem<'_>, base: Gva) -> Field<UserRegs> {
        // One read of the whole struct (it is small), then the fields out of it.
        let len = usize::try_from(self.off.pt_regs_size.min(4096)).unwrap_or(0);
        let mut raw = vec![0u8; len];
        vm.read(base, &mut raw)
            .map_err(|_| Unreadable { at: base })?;
        let mut regs = UserRegs::default();
        for (i, &(off, size)) in self.off.pt_regs.iter().enumerate() {
            let field = usize::try_from(off)
                .ok()
                .and_then(|o| raw.get(o..o.checked_add(usize::try_from(size.min(8)).ok()?)?))
                .ok_or(Unreadable { at: at(base, off) })?;
            let mut b = [0u8; 8];
            b[..field.len()].copy_from_slice(field);
            regs.set(i, u64::from_le_bytes(b));
        }
        Ok(regs)
    }
}
