//! The running kernel seen through a profile and its slides: per-CPU bases, the current
//! task of a vCPU, the direct map.

use crate::kaslr::KernelLayout;
use crate::paging::{PageRoot, PagingError, PagingMode, TranslationCache};
use crate::profile::{Profile, ProfileError};
use crate::vmem::VirtMem;
use ornament_engine::{Gpa, Gva, MemError, PhysMemory, Regs};
use std::sync::OnceLock;

/// Why a kernel-level read failed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum KernelError {
    /// the profile lacks something the reader needs
    Profile(#[from] ProfileError),
    /// cannot read {what}
    Paging {
        /// What was being read.
        what: &'static str,
        /// The translation or memory error.
        #[source]
        source: PagingError,
    },
    /// cannot read {what} from guest-physical memory
    Mem {
        /// What was being read.
        what: &'static str,
        /// The memory error.
        #[source]
        source: MemError,
    },
    /// no per-CPU base: neither GS base ({gs:#x}) nor kernel GS base ({kernel_gs:#x}) is a kernel address
    NoPerCpuBase {
        /// GS base.
        gs: u64,
        /// MSR_KERNEL_GS_BASE.
        kernel_gs: u64,
    },
    /// {what} is {value}, not a kernel address
    NotKernelAddress {
        /// What was read.
        what: &'static str,
        /// The value.
        value: Gva,
    },
}

/// True for canonical upper-half (kernel) addresses, in either paging mode.
pub fn is_kernel_address(gva: Gva) -> bool {
    gva.raw() >> 63 == 1 && gva.is_canonical_57()
}

/// A running kernel: guest memory, its profile and its slides.
pub struct Kernel<'a> {
    mem: &'a dyn PhysMemory,
    profile: &'a Profile,
    layout: KernelLayout,
    cache: TranslationCache,
    page_offset_base: OnceLock<u64>,
}

impl std::fmt::Debug for Kernel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("release", &self.profile.kernel.release)
            .field("layout", &self.layout)
            .field("mem_bytes", &self.mem.size())
            .finish()
    }
}

impl<'a> Kernel<'a> {
    /// A kernel described by `profile`, moved by `layout`.
    pub fn new(mem: &'a dyn PhysMemory, profile: &'a Profile, layout: KernelLayout) -> Self {
        Self {
            mem,
            profile,
            layout,
            cache: TranslationCache::new(),
            page_offset_base: OnceLock::new(),
        }
    }

    /// The profile.
    pub fn profile(&self) -> &'a Profile {
        self.profile
    }

    /// The slides.
    pub fn layout(&self) -> KernelLayout {
        self.layout
    }

    /// Guest-physical memory.
    pub fn mem(&self) -> &'a dyn PhysMemory {
        self.mem
    }

    /// The translation cache shared by this kernel's readers; invalidate it when the
    /// guest has run (page tables may have changed).
    pub fn cache(&self) -> &TranslationCache {
        &self.cache
    }

    /// Runtime address of profile symbol `name`.
    pub fn symbol(&self, name: &str) -> Result<Gva, KernelError> {
        Ok(self.layout.symbol(self.profile, name)?)
    }

    /// Kernel address space of a vCPU (the kernel half of a PTI pair when in user mode).
    pub fn kernel_vm(&self, regs: &Regs) -> VirtMem<'_> {
        VirtMem::new(self.mem, PageRoot::kernel_from_cr3(regs.cr3, regs.cr4))
            .with_cache(&self.cache)
    }

    /// The per-CPU base of the vCPU: GS base in kernel mode, MSR_KERNEL_GS_BASE in user
    /// mode. Right after a syscall entry and before `swapgs` the two are not yet swapped,
    /// so whichever one holds a kernel address is taken.
    pub fn percpu_base(&self, regs: &Regs) -> Result<Gva, KernelError> {
        let (first, second) = if regs.in_kernel_mode() {
            (regs.gs_base, regs.kernel_gs_base)
        } else {
            (regs.kernel_gs_base, regs.gs_base)
        };
        [first, second]
            .into_iter()
            .map(Gva)
            .find(|&g| is_kernel_address(g))
            .ok_or(KernelError::NoPerCpuBase {
                gs: regs.gs_base,
                kernel_gs: regs.kernel_gs_base,
            })
    }

    /// The per-CPU base of CPU `cpu` from `__per_cpu_offset[cpu]` (read physically).
    pub fn percpu_base_of_cpu(&self, cpu: u32) -> Result<Gva, KernelError> {
        let table = self.profile.symbol("__per_cpu_offset")?;
        let entry = table.wrapping_add(u64::from(cpu) * 8);
        Ok(Gva(self.read_image_u64(entry, "__per_cpu_offset")?))
    }

    /// The `task_struct` running on the vCPU whose registers are `regs`.
    pub fn current_task(&self, regs: &Regs) -> Result<Gva, KernelError> {
        let base = self.percpu_base(regs)?;
        self.current_task_at(&self.kernel_vm(regs), base)
    }

    /// Like [`Kernel::current_task`], but when neither GS base holds a kernel address
    /// (an engine that cannot read MSR_KERNEL_GS_BASE, a vCPU in user mode) the per-CPU
    /// base of CPU `vcpu` is taken from `__per_cpu_offset` (vCPU index == CPU number).
    pub fn current_task_on(&self, regs: &Regs, vcpu: u32) -> Result<Gva, KernelError> {
        let base = match self.percpu_base(regs) {
            Ok(b) => b,
            Err(KernelError::NoPerCpuBase { .. }) => self.percpu_base_of_cpu(vcpu)?,
            Err(e) => return Err(e),
        };
        self.current_task_at(&self.kernel_vm(regs), base)
    }

    /// The `task_struct` recorded as current in the per-CPU area at `base`.
    pub fn current_task_at(&self, vm: &VirtMem<'_>, base: Gva) -> Result<Gva, KernelError> {
        let at = base.wrapping_add(self.profile.percpu_current_task.offset());
        let task = vm.read_ptr(at).map_err(|source| KernelError::Paging {
            what: "the per-CPU current task",
            source,
        })?;
        if !is_kernel_address(task) {
            return Err(KernelError::NotKernelAddress {
                what: "the per-CPU current task",
                value: task,
            });
        }
        Ok(task)
    }

    /// The value of the kernel variable `page_offset_base` (start of the direct map).
    pub fn page_offset_base(&self) -> Result<u64, KernelError> {
        if let Some(&v) = self.page_offset_base.get() {
            return Ok(v);
        }
        let sym = self.profile.symbol("page_offset_base")?;
        let v = self.read_image_u64(sym, "page_offset_base")?;
        if !is_kernel_address(Gva(v)) {
            return Err(KernelError::NotKernelAddress {
                what: "page_offset_base",
                value: Gva(v),
            });
        }
        Ok(*self.page_offset_base.get_or_init(|| v))
    }

    /// Physical address of a direct-map (`page_offset_base`-relative) kernel address.
    pub fn direct_map_phys(&self, gva: Gva) -> Result<Gpa, KernelError> {
        let base = self.page_offset_base()?;
        gva.raw()
            .checked_sub(base)
            .map(Gpa)
            .ok_or(KernelError::NotKernelAddress {
                what: "a direct-map address",
                value: gva,
            })
    }

    /// The address space whose top-level table is at kernel address `pgd` (an `mm->pgd`).
    pub fn root_of_pgd(&self, pgd: Gva, mode: PagingMode) -> Result<PageRoot, KernelError> {
        Ok(PageRoot {
            table: self.direct_map_phys(pgd)?,
            mode,
        })
    }

    /// A u64 of the kernel image at link-time address `link`, read physically.
    fn read_image_u64(&self, link: Gva, what: &'static str) -> Result<u64, KernelError> {
        let mut b = [0u8; 8];
        self.mem
            .read_phys(self.layout.phys(link), &mut b)
            .map_err(|source| KernelError::Mem { what, source })?;
        Ok(u64::from_le_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{committed_profiles, SynthConfig, SynthGuest, PAGE_OFFSET_4};

    #[test]
    fn percpu_bases_and_direct_map() {
        let p = committed_profiles().remove(1);
        let g = SynthGuest::new(p, SynthConfig::default()).expect("guest");
        let k = Kernel::new(&g.phys.mem, &g.profile, g.layout);
        for cpu in 0..2 {
            assert_eq!(k.percpu_base_of_cpu(cpu).ok(), g.percpu_base(cpu));
        }
        // At entry_SYSCALL_64, before swapgs: kernel CS, user GS base.
        let mut r = g.regs_kernel(1, Gva(0));
        std::mem::swap(&mut r.gs_base, &mut r.kernel_gs_base);
        assert_eq!(k.percpu_base(&r).ok(), g.percpu_base(1));
        r.kernel_gs_base = 0;
        assert!(matches!(
            k.percpu_base(&r),
            Err(KernelError::NoPerCpuBase { .. })
        ));
        // Then __per_cpu_offset[vcpu] answers.
        let t = g.init_task().expect("init");
        g.set_current(1, t.wrapping_add(0x40)).expect("w");
        assert_eq!(k.current_task_on(&r, 1).ok(), Some(t.wrapping_add(0x40)));
        assert_eq!(k.current_task_on(&r, 0).ok(), Some(t));
        assert_eq!(k.page_offset_base().expect("pob"), PAGE_OFFSET_4);
        assert_eq!(
            k.direct_map_phys(Gva(PAGE_OFFSET_4 + 0x1234)).expect("dm"),
            Gpa(0x1234)
        );
        assert!(k.direct_map_phys(Gva(0x1000)).is_err());
        // A current-task slot holding a user address is refused.
        g.set_current(0, Gva(0x7fff_0000_0000)).expect("w");
        assert!(matches!(
            k.current_task(&g.regs_kernel(0, Gva(0))),
            Err(KernelError::NotKernelAddress { .. })
        ));
        assert!(is_kernel_address(Gva(0xffff_8880_0000_0000)));
        assert!(!is_kernel_address(Gva(0x8000_0000_0000_0000)));
    }
}
