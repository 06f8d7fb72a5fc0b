//! Synthetic guests for tests: page tables, per-CPU areas and `task_struct`s laid out at a
//! profile's offsets in a [`SliceMemory`], so every reader can be checked against what
//! was written, with no VM.

use crate::kaslr::KernelLayout;
use crate::paging::{
    translate, PageRoot, PageSize, PagingMode, ADDR_MASK, PAGE_SIZE, PTE_PAGE_SIZE, PTE_PRESENT,
    PTE_USER, PTE_WRITABLE,
};
use crate::profile::Profile;
use ornament_engine::{Gpa, Gva, PhysMemory, Regs, SliceMemory};

/// Why building a synthetic guest failed (always a bug in the test that builds it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum TestingError {
    /// the synthetic guest ran out of physical memory
    OutOfMemory,
    /// {gva} is already mapped differently
    Conflict {
        /// The address.
        gva: Gva,
    },
    /// {gva} is not mapped in the synthetic guest
    NotMapped {
        /// The address.
        gva: Gva,
    },
    /// the profile lacks {what}
    Profile {
        /// What was missing.
        what: &'static str,
    },
}

/// Physical memory plus a bump allocator for page-table and data pages.
#[derive(Debug)]
pub struct PhysAlloc {
    /// The guest's memory.
    pub mem: SliceMemory,
    next: u64,
    end: u64,
}

impl PhysAlloc {
    /// `size` bytes of memory; pages are handed out from `[start, end)`.
    pub fn new(size: usize, start: u64, end: u64) -> Self {
        Self {
            mem: SliceMemory::new(size),
            next: start,
            end,
        }
    }

    /// A zeroed 4 KiB page.
    pub fn page(&mut self) -> Result<Gpa, TestingError> {
        self.pages(1)
    }

    /// `n` contiguous zeroed 4 KiB pages.
    pub fn pages(&mut self, n: u64) -> Result<Gpa, TestingError> {
        let at = self.next;
        let end = at
            .checked_add(n * PAGE_SIZE)
            .filter(|&e| e <= self.end)
            .ok_or(TestingError::OutOfMemory)?;
        self.next = end;
        Ok(Gpa(at))
    }

    /// Write bytes at a physical address.
    pub fn write(&self, gpa: Gpa, bytes: &[u8]) -> Result<(), TestingError> {
        self.mem
            .write_phys(gpa, bytes)
            .map_err(|_| TestingError::OutOfMemory)
    }

    fn read_u64(&self, gpa: Gpa) -> Result<u64, TestingError> {
        let mut b = [0u8; 8];
        self.mem
            .read_phys(gpa, &mut b)
            .map_err(|_| TestingError::OutOfMemory)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A fresh, empty top-level table (8 KiB aligned, so a PTI user half fits after it).
    pub fn new_root(&mut self, mode: PagingMode) -> Result<PageRoot, TestingError> {
        if !self.next.is_multiple_of(2 * PAGE_SIZE) {
            self.page()?;
        }
        let table = self.pages(2)?;
        Ok(PageRoot { table, mode })
    }

    /// Map one page of `size` at `gva` to `gpa` under `root` (user-accessible when `user`).
    pub fn map(
        &mut self,
        root: PageRoot,
        gva: Gva,
        gpa: Gpa,
        size: PageSize,
        user: bool,
    ) -> Result<(), TestingError> {
        let levels: u8 = match root.mode {
            PagingMode::Level4 => 4,
            PagingMode::Level5 => 5,
        };
        let leaf_level: u8 = match size {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        };
        let flags = PTE_PRESENT | PTE_WRITABLE | if user { PTE_USER } else { 0 };
        let mut table = root.table.raw();
        for level in (leaf_level..=levels).rev() {
            let shift = 12 + 9 * u32::from(level - 1);
            let slot = Gpa(table + ((gva.raw() >> shift) & 0x1ff) * 8);
            let entry = self.read_u64(slot)?;
            if level == leaf_level {
                let ps = if leaf_level > 1 { PTE_PAGE_SIZE } else { 0 };
                let new = (gpa.raw() & ADDR_MASK) | flags | ps;
                if entry & PTE_PRESENT != 0 && entry != new {
                    return Err(TestingError::Conflict { gva });
                }
                return self.write(slot, &new.to_le_bytes());
            }
            if entry & PTE_PRESENT == 0 {
                let next = self.page()?;
                let e = next.raw() | PTE_PRESENT | PTE_WRITABLE | PTE_USER;
                self.write(slot, &e.to_le_bytes())?;
                table = next.raw();
            } else if entry & PTE_PAGE_SIZE != 0 {
                return Err(TestingError::Conflict { gva });
            } else {
                table = entry & ADDR_MASK;
            }
        }
        Ok(())
    }

    /// Write `bytes` at `gva` through the tables under `root` (must be mapped).
    pub fn write_virt(&self, root: PageRoot, gva: Gva, bytes: &[u8]) -> Result<(), TestingError> {
        let mut done = 0usize;
        while done < bytes.len() {
            let at = gva.wrapping_add(done as u64);
            let t =
                translate(&self.mem, root, at).map_err(|_| TestingError::NotMapped { gva: at })?;
            let in_page = PAGE_SIZE - (at.raw() & (PAGE_SIZE - 1));
            let n = usize::try_from(in_page)
                .unwrap_or(usize::MAX)
                .min(bytes.len() - done);
            self.write(t.gpa, &bytes[done..done + n])?;
            done += n;
        }
        Ok(())
    }
}

/// Start of the direct map (`page_offset_base`) with 4-level paging (no KASLR of it).
pub const PAGE_OFFSET_4: u64 = 0xffff_8880_0000_0000;
/// Start of the direct map with 5-level paging.
pub const PAGE_OFFSET_5: u64 = 0xff11_0000_0000_0000;
/// Where synthetic user processes keep their argument strings.
pub const USER_ARGS: u64 = 0x7ffd_dead_0ff0;

/// How to lay out a synthetic guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynthConfig {
    /// 4- or 5-level paging.
    pub mode: PagingMode,
    /// KASLR virtual slide (multiple of 2 MiB).
    pub virt_slide: u64,
    /// KASLR physical slide (multiple of 2 MiB).
    pub phys_slide: u64,
    /// Number of CPUs (per-CPU areas).
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub mem_size_mib: usize,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            mode: PagingMode::Level4,
            virt_slide: 0x1e00_0000,
            phys_slide: 0x0200_0000,
            cpus: 2,
            mem_size_mib: 128,
        }
    }
}

/// A task to lay out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSpec {
    /// `pid`.
    pub pid: i32,
    /// `tgid`.
    pub tgid: i32,
    /// `comm` (cut to the field's size minus the NUL).
    pub comm: String,
    /// Real parent (`None`: `init_task`).
    pub parent: Option<Gva>,
    /// uid, gid, euid, egid.
    pub creds: [u32; 4],
    /// A kernel thread: `PF_KTHREAD`, no mm.
    pub kernel_thread: bool,
    /// Executable path (user tasks), e.g. `/bin/busybox`.
    pub exe_path: Option<String>,
    /// Command line (user tasks).
    pub argv: Vec<String>,
    /// Working directory (`task->fs->pwd`), where the profile has `fs_struct`; `None`
    /// leaves `task->fs` NULL, as after the task left it on exit.
    pub cwd: Option<String>,
}

impl TaskSpec {
    /// A user process with pid == tgid.
    pub fn user(pid: i32, comm: &str, exe: &str, argv: &[&str]) -> Self {
        Self {
            pid,
            tgid: pid,
            comm: comm.into(),
            parent: None,
            creds: [0; 4],
            kernel_thread: false,
            exe_path: Some(exe.into()),
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            cwd: None,
        }
    }

    /// A kernel thread.
    pub fn kthread(pid: i32, comm: &str) -> Self {
        Self {
            kernel_thread: true,
            exe_path: None,
            ..Self::user(pid, comm, "", &[])
        }
    }
}

/// A kernel's memory as a profile describes it: kernel image mapped with 2 MiB pages at
/// its slid address, the direct map with 1 GiB pages, per-CPU areas, `init_task` and
/// the tasks added to it, each process with its own user page tables.
#[derive(Debug)]
pub struct SynthGuest {
    /// Physical memory and its allocator.
    pub phys: PhysAlloc,
    /// The profile whose offsets are used.
    pub profile: Profile,
    /// The slides applied.
    pub layout: KernelLayout,
    /// The kernel page tables.
    pub root: PageRoot,
    /// The direct map's start.
    pub page_offset_base: u64,
    percpu: Vec<Gva>,
}

/// PTI user half of a CPU's CR3 (see [`crate::paging::CR3_PTI_USER`]).
const CR3_USER_PCID: u64 = crate::paging::CR3_PTI_USER | 1;

impl SynthGuest {
    /// Lay out a guest for `profile`.
    pub fn new(profile: Profile, cfg: SynthConfig) -> Result<Self, TestingError> {
        let size = cfg.mem_size_mib << 20;
        let mut phys = PhysAlloc::new(size, 1 << 20, 16 << 20);
        let root = phys.new_root(cfg.mode)?;
        let layout = KernelLayout {
            virt_slide: cfg.virt_slide,
            phys_slide: cfg.phys_slide,
        };
        let page_offset_base = match cfg.mode {
            PagingMode::Level4 => PAGE_OFFSET_4,
            PagingMode::Level5 => PAGE_OFFSET_5,
        };
        let gib = PageSize::Size1G.bytes();
        for i in 0..(size as u64).div_ceil(gib) {
            phys.map(
                root,
                Gva(page_offset_base + i * gib),
                Gpa(i * gib),
                PageSize::Size1G,
                false,
            )?;
        }
        let sym = |name: &'static str| {
            profile
                .symbol(name)
                .map_err(|_| TestingError::Profile { what: name })
        };
        let text = sym("_text")?;
        let end = profile
            .symbol("_end")
            .unwrap_or(text.wrapping_add(64 << 20));
        let two_m = PageSize::Size2M.bytes();
        let mut v = text.raw() & !(two_m - 1);
        while v < end.raw() {
            let link = Gva(v);
            phys.map(
                root,
                layout.virt(link),
                layout.phys(link),
                PageSize::Size2M,
                false,
            )?;
            v += two_m;
        }
        let mut g = Self {
            phys,
            profile,
            layout,
            root,
            page_offset_base,
            percpu: Vec::new(),
        };
        g.write_sym_u64("page_offset_base", page_offset_base)?;
        g.write_sym_u64("phys_base", cfg.phys_slide)?;
        let banner = g.profile.kernel.banner.clone().unwrap_or_else(|| {
            format!(
                "Linux version {} (synthetic) #1\n",
                g.profile.kernel.release
            )
        });
        let mut b = banner.into_bytes();
        b.push(0);
        let at = g.layout.virt(sym_of(&g.profile, "linux_banner")?);
        g.write(at, &b)?;

        // Per-CPU areas.
        let need = g.profile.percpu_current_task.offset() + 8;
        let per_cpu_table = g.layout.virt(sym_of(&g.profile, "__per_cpu_offset")?);
        for cpu in 0..cfg.cpus {
            let area = g.phys.pages(need.div_ceil(PAGE_SIZE))?;
            let base = Gva(page_offset_base + area.raw());
            g.write(
                per_cpu_table.wrapping_add(u64::from(cpu) * 8),
                &base.raw().to_le_bytes(),
            )?;
            g.percpu.push(base);
        }

        // init_task: an empty process list, pid 0, a kernel thread.
        let init = g.init_task()?;
        let tasks = g.off("task_struct", "tasks")?;
        let head = init.wrapping_add(tasks);
        g.write_u64(head, head.raw())?;
        g.write_u64(head.wrapping_add(8), head.raw())?;
        g.fill_task(init, &TaskSpec::kthread(0, "swapper/0"), init)?;
        for cpu in 0..cfg.cpus {
            g.set_current(cpu, init)?;
        }
        Ok(g)
    }

    /// Runtime address of `init_task`.
    pub fn init_task(&self) -> Result<Gva, TestingError> {
        Ok(self.layout.virt(sym_of(&self.profile, "init_task")?))
    }

    /// Byte offset of `strukt.member` in the profile.
    pub fn off(&self, strukt: &str, member: &'static str) -> Result<u64, TestingError> {
        self.profile
            .offset(strukt, member)
            .map_err(|_| TestingError::Profile { what: member })
    }

    fn layout_of(
        &self,
        strukt: &'static str,
    ) -> Result<crate::profile::StructLayout, TestingError> {
        self.profile
            .structs
            .get(strukt)
            .cloned()
            .ok_or(TestingError::Profile { what: strukt })
    }

    fn write_sym_u64(&self, name: &'static str, v: u64) -> Result<(), TestingError> {
        let at = self.layout.virt(sym_of(&self.profile, name)?);
        self.write_u64(at, v)
    }

    /// Write through the kernel page tables.
    pub fn write(&self, gva: Gva, bytes: &[u8]) -> Result<(), TestingError> {
        self.phys.write_virt(self.root, gva, bytes)
    }

    /// Write a u64 through the kernel page tables.
    pub fn write_u64(&self, gva: Gva, v: u64) -> Result<(), TestingError> {
        self.write(gva, &v.to_le_bytes())
    }

    /// Write a u32 through the kernel page tables.
    pub fn write_u32(&self, gva: Gva, v: u32) -> Result<(), TestingError> {
        self.write(gva, &v.to_le_bytes())
    }

    /// Fresh zeroed kernel memory of `len` bytes (in the direct map).
    pub fn alloc(&mut self, len: u64) -> Result<Gva, TestingError> {
        let p = self.phys.pages(len.max(1).div_ceil(PAGE_SIZE))?;
        Ok(Gva(self.page_offset_base + p.raw()))
    }

    /// A NUL-terminated copy of `s` in kernel memory.
    pub fn alloc_str(&mut self, s: &str) -> Result<Gva, TestingError> {
        let at = self.alloc(s.len() as u64 + 1)?;
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.write(at, &b)?;
        Ok(at)
    }

    /// The per-CPU base of `cpu`.
    pub fn percpu_base(&self, cpu: u32) -> Option<Gva> {
        self.percpu.get(cpu as usize).copied()
    }

    /// Make `task` the current task of `cpu`.
    pub fn set_current(&self, cpu: u32, task: Gva) -> Result<(), TestingError> {
        let base = self
            .percpu_base(cpu)
            .ok_or(TestingError::Profile { what: "cpu" })?;
        self.write_u64(
            base.wrapping_add(self.profile.percpu_current_task.offset()),
            task.raw(),
        )
    }

    fn cr4(&self) -> u64 {
        match self.root.mode {
            PagingMode::Level4 => 0x20,
            PagingMode::Level5 => 0x20 | crate::paging::CR4_LA57,
        }
    }

    /// Registers of `cpu` stopped in kernel mode at `rip` (GS base = per-CPU base).
    pub fn regs_kernel(&self, cpu: u32, rip: Gva) -> Regs {
        Regs {
            rip: rip.raw(),
            cs: 0x10,
            cr3: self.root.table.raw(),
            cr4: self.cr4(),
            gs_base: self.percpu_base(cpu).map_or(0, |g| g.raw()),
            kernel_gs_base: 0x7f00_0000_0000,
            ..Regs::default()
        }
    }

    /// Registers of `cpu` in user mode: PTI user CR3 with a PCID, per-CPU base in
    /// MSR_KERNEL_GS_BASE.
    pub fn regs_user(&self, cpu: u32) -> Regs {
        Regs {
            rip: 0x40_1000,
            cs: 0x33,
            cr3: self.root.table.raw() | CR3_USER_PCID,
            cr4: self.cr4(),
            gs_base: 0x7f00_0000_0000,
            kernel_gs_base: self.percpu_base(cpu).map_or(0, |g| g.raw()),
            ..Regs::default()
        }
    }

    /// Lay out a task, link it at the tail of `init_task.tasks`, return its address.
    pub fn add_task(&mut self, spec: &TaskSpec) -> Result<Gva, TestingError> {
        let size = self
            .profile
            .structs
            .get("task_struct")
            .map(|s| s.size)
            .ok_or(TestingError::Profile {
                what: "task_struct",
            })?;
        let task = self.alloc(size)?;
        let parent = match spec.parent {
            Some(p) => p,
            None => self.init_task()?,
        };
        self.fill_task(task, spec, parent)?;
        self.link_task(task)?;
        Ok(task)
    }

    /// Append `task` to `init_task.tasks`.
    pub fn link_task(&self, task: Gva) -> Result<(), TestingError> {
        let tasks = self.off("task_struct", "tasks")?;
        let head = self.init_task()?.wrapping_add(tasks);
        let node = task.wrapping_add(tasks);
        let mut b = [0u8; 8];
        let prev_gpa = translate(&self.phys.mem, self.root, head.wrapping_add(8))
            .map_err(|_| TestingError::NotMapped { gva: head })?;
        self.phys
            .mem
            .read_phys(prev_gpa.gpa, &mut b)
            .map_err(|_| TestingError::OutOfMemory)?;
        let prev = Gva(u64::from_le_bytes(b));
        self.write_u64(node, head.raw())?;
        self.write_u64(node.wrapping_add(8), prev.raw())?;
        self.write_u64(prev, node.raw())?;
        self.write_u64(head.wrapping_add(8), node.raw())
    }

    fn fill_task(&mut self, task: Gva, spec: &TaskSpec, parent: Gva) -> Result<(), TestingError> {
        let ts = self.layout_of("task_struct")?;
        let o = |m: &'static str| field_off(&ts, m);
        self.write(task.wrapping_add(o("pid")?), &spec.pid.to_le_bytes())?;
        self.write(task.wrapping_add(o("tgid")?), &spec.tgid.to_le_bytes())?;
        let comm_size = self
            .profile
            .field("task_struct", "comm")
            .map_err(|_| TestingError::Profile { what: "comm" })?
            .size;
        let mut comm = vec![0u8; usize::try_from(comm_size).unwrap_or(16)];
        let n = spec.comm.len().min(comm.len().saturating_sub(1));
        comm[..n].copy_from_slice(&spec.comm.as_bytes()[..n]);
        self.write(task.wrapping_add(o("comm")?), &comm)?;
        self.write_u64(task.wrapping_add(o("real_parent")?), parent.raw())?;
        self.write_u64(task.wrapping_add(o("parent")?), parent.raw())?;
        self.write_u64(task.wrapping_add(o("group_leader")?), task.raw())?;
        let flags = if spec.kernel_thread {
            crate::task::PF_KTHREAD
        } else {
            0
        };
        self.write_u32(task.wrapping_add(o("flags")?), flags)?;
        let stack = self.alloc(self.profile.thread_size)?;
        self.write_u64(task.wrapping_add(o("stack")?), stack.raw())?;

        let cred_size = self.profile.structs.get("cred").map_or(256, |s| s.size);
        let cred = self.alloc(cred_size)?;
        for (m, v) in ["uid", "gid", "euid", "egid"].into_iter().zip(spec.creds) {
            self.write_u32(cred.wrapping_add(self.off("cred", m)?), v)?;
        }
        self.write_u64(task.wrapping_add(o("cred")?), cred.raw())?;
        if let (Some(cwd), Ok(fs), Ok(pwd)) = (&spec.cwd, o("fs"), self.off("fs_struct", "pwd")) {
            let size = self.profile.structs.get("fs_struct").map_or(64, |s| s.size);
            let fs_struct = self.alloc(size)?;
            let (root, dentry) = self.dentry_chain_from_root(cwd)?;
            let mnt = self.add_mount(None, root)?;
            let at = |m| self.off("path", m).map(|o| fs_struct.wrapping_add(pwd + o));
            let (d, m) = (at("dentry")?, at("mnt")?);
            self.write_u64(d, dentry.raw())?;
            self.write_u64(m, mnt.raw())?;
            self.write_u64(task.wrapping_add(fs), fs_struct.raw())?;
        }
        self.write_u64(task.wrapping_add(o("real_cred")?), cred.raw())?;

        if spec.kernel_thread {
            return Ok(());
        }
        let mm_size = self
            .profile
            .structs
            .get("mm_struct")
            .map_or(4096, |s| s.size);
        let mm = self.alloc(mm_size)?;
        let user_root = self.phys.new_root(self.root.mode)?;
        let mms = self.layout_of("mm_struct")?;
        let mm_off = |m: &'static str| field_off(&mms, m);
        self.write_u64(
            mm.wrapping_add(mm_off("pgd")?),
            self.page_offset_base + user_root.table.raw(),
        )?;
        // Arguments at a fixed user address, across a page boundary.
        let mut args = Vec::new();
        for a in &spec.argv {
            args.extend_from_slice(a.as_bytes());
            args.push(0);
        }
        let first = USER_ARGS & !(PAGE_SIZE - 1);
        let last = (USER_ARGS + args.len() as u64 + 1) & !(PAGE_SIZE - 1);
        let mut p = first;
        while p <= last {
            let frame = self.phys.page()?;
            self.phys
                .map(user_root, Gva(p), frame, PageSize::Size4K, true)?;
            p += PAGE_SIZE;
        }
        self.phys.write_virt(user_root, Gva(USER_ARGS), &args)?;
        self.write_u64(mm.wrapping_add(mm_off("arg_start")?), USER_ARGS)?;
        self.write_u64(
            mm.wrapping_add(mm_off("arg_end")?),
            USER_ARGS + args.len() as u64,
        )?;
        if let Some(path) = &spec.exe_path {
            let (root, dentry) = self.dentry_chain_from_root(path)?;
            let mnt = self.add_mount(None, root)?;
            let file = self.add_file(mnt, dentry)?;
            self.write_u64(mm.wrapping_add(mm_off("exe_file")?), file.raw())?;
        }
        self.write_u64(task.wrapping_add(o("mm")?), mm.raw())?;
        self.write_u64(task.wrapping_add(o("active_mm")?), mm.raw())?;
        Ok(())
    }

    /// Write `regs` as the task's saved user registers (`pt_regs` at the top of its stack).
    pub fn write_user_regs(
        &self,
        task: Gva,
        regs: &crate::task::UserRegs,
    ) -> Result<(), TestingError> {
        let stack = self.read_u64(task.wrapping_add(self.off("task_struct", "stack")?))?;
        let size = self
            .profile
            .structs
            .get("pt_regs")
            .map(|s| s.size)
            .ok_or(TestingError::Profile { what: "pt_regs" })?;
        let base = Gva(stack + self.profile.thread_size - size);
        for (m, v) in crate::task::UserRegs::MEMBERS
            .into_iter()
            .zip(regs.values())
        {
            let f = self
                .profile
                .field("pt_regs", m)
                .map_err(|_| TestingError::Profile { what: m })?;
            let n = usize::try_from(f.size.min(8)).unwrap_or(8);
            self.write(base.wrapping_add(f.offset), &v.to_le_bytes()[..n])?;
        }
        Ok(())
    }

    /// Read a u64 through the kernel page tables.
    pub fn read_u64(&self, gva: Gva) -> Result<u64, TestingError> {
        let t = translate(&self.phys.mem, self.root, gva)
            .map_err(|_| TestingError::NotMapped { gva })?;
        self.phys.read_u64(t.gpa)
    }

    /// Dentries for `path` (`/a/b/c`): returns the last; the root is its own parent.
    pub fn dentry_chain(&mut self, path: &str) -> Result<Gva, TestingError> {
        Ok(self.dentry_chain_from_root(path)?.1)
    }

    /// A `struct mount` whose root dentry is `root`, mounted at `on` = (parent vfsmount,
    /// mount-point dentry), or the root of the tree (its own parent) when `on` is
    /// `None`; returns its `vfsmount`. A no-op returning 0 where the profile has no
    /// mount offsets.
    pub fn add_mount(&mut self, on: Option<(Gva, Gva)>, root: Gva) -> Result<Gva, TestingError> {
        let (Ok(mnt), Ok(parent), Ok(point), Ok(mnt_root)) = (
            self.off("mount", "mnt"),
            self.off("mount", "mnt_parent"),
            self.off("mount", "mnt_mountpoint"),
            self.off("vfsmount", "mnt_root"),
        ) else {
            return Ok(Gva(0));
        };
        let size = self.profile.structs.get("mount").map_or(512, |s| s.size);
        let mount = self.alloc(size)?;
        let vfsmount = mount.wrapping_add(mnt);
        let (parent_mount, mountpoint) = match on {
            Some((pm, d)) => (pm.wrapping_sub(mnt), d),
            None => (mount, root),
        };
        self.write_u64(mount.wrapping_add(parent), parent_mount.raw())?;
        self.write_u64(mount.wrapping_add(point), mountpoint.raw())?;
        self.write_u64(vfsmount.wrapping_add(mnt_root), root.raw())?;
        Ok(vfsmount)
    }

    /// A `struct file` whose `f_path` is (`vfsmount`, `dentry`).
    pub fn add_file(&mut self, vfsmount: Gva, dentry: Gva) -> Result<Gva, TestingError> {
        let file_size = self.profile.structs.get("file").map_or(256, |s| s.size);
        let file = self.alloc(file_size)?;
        let f_path = self.off("file", "f_path")?;
        self.write_u64(
            file.wrapping_add(f_path + self.off("path", "dentry")?),
            dentry.raw(),
        )?;
        self.write_u64(
            file.wrapping_add(f_path + self.off("path", "mnt")?),
            vfsmount.raw(),
        )?;
        Ok(file)
    }

    /// A dentry named `name` under `parent` (its own parent when `None`: a root, or a
    /// file with no place in any tree such as a memfd), hashed (in the dentry cache,
    /// not deleted) unless `deleted`.
    pub fn add_dentry(
        &mut self,
        parent: Option<Gva>,
        name: &str,
        deleted: bool,
    ) -> Result<Gva, TestingError> {
        let size = self.profile.structs.get("dentry").map_or(256, |s| s.size);
        let d = self.alloc(size)?;
        let s = self.alloc_str(name)?;
        let name_off = self.off("dentry", "d_name")?;
        let (qname, qlen) = (self.off("qstr", "name")?, self.off("qstr", "len")?);
        self.write_u64(
            d.wrapping_add(self.off("dentry", "d_parent")?),
            parent.unwrap_or(d).raw(),
        )?;
        self.write_u64(d.wrapping_add(name_off + qname), s.raw())?;
        let len = u32::try_from(name.len()).map_err(|_| TestingError::OutOfMemory)?;
        self.write_u32(d.wrapping_add(name_off + qlen), len)?;
        self.hash_dentry(d, !deleted)?;
        Ok(d)
    }

    /// Mark `d` hashed (its `d_hash.pprev` non-NULL) or unhashed, where the profile
    /// records it.
    fn hash_dentry(&mut self, d: Gva, hashed: bool) -> Result<(), TestingError> {
        if let (Ok(h), Ok(pprev)) = (
            self.off("dentry", "d_hash"),
            self.off("hlist_bl_node", "pprev"),
        ) {
            // Any kernel address will do for the previous link: it is only tested for NULL.
            self.write_u64(d.wrapping_add(h + pprev), if hashed { d.raw() } else { 0 })?;
        }
        Ok(())
    }

    /// As [`SynthGuest::dentry_chain`], and the root dentry.
    pub fn dentry_chain_from_root(&mut self, path: &str) -> Result<(Gva, Gva), TestingError> {
        let size = self.profile.structs.get("dentry").map_or(256, |s| s.size);
        let parent_off = self.off("dentry", "d_parent")?;
        let name_off = self.off("dentry", "d_name")?;
        let (qname, qlen) = (self.off("qstr", "name")?, self.off("qstr", "len")?);
        let root = self.alloc(size)?;
        self.write_u64(root.wrapping_add(parent_off), root.raw())?;
        let slash = self.alloc_str("/")?;
        self.write_u64(root.wrapping_add(name_off + qname), slash.raw())?;
        self.write_u32(root.wrapping_add(name_off + qlen), 1)?;
        let mut cur = root;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let d = self.alloc(size)?;
            let s = self.alloc_str(part)?;
            self.write_u64(d.wrapping_add(parent_off), cur.raw())?;
            self.write_u64(d.wrapping_add(name_off + qname), s.raw())?;
            let len = u32::try_from(part.len()).map_err(|_| TestingError::OutOfMemory)?;
            self.write_u32(d.wrapping_add(name_off + qlen), len)?;
            self.hash_dentry(d, true)?;
            cur = d;
        }
        Ok((root, cur))
    }
}

fn field_off(layout: &crate::profile::StructLayout, m: &'static str) -> Result<u64, TestingError> {
    layout
        .fields
        .get(m)
        .map(|f| f.offset)
        .ok_or(TestingError::Profile { what: m })
}

fn sym_of(profile: &Profile, name: &'static str) -> Result<Gva, TestingError> {
    profile
        .symbol(name)
        .map_err(|_| TestingError::Profile { what: name })
}

/// The profiles committed in `profiles/`, for tests.
#[cfg(test)]
pub(crate) fn committed_profiles() -> Vec<Profile> {
    [
        include_str!("../../profiles/6.1.0-50-cloud-amd64.json"),
        include_str!("../../profiles/6.12.117+deb12-cloud-amd64.json"),
    ]
    .into_iter()
    .map(|t| {
        Profile::from_json(t.as_bytes(), std::path::Path::new("profiles/"))
            .expect("committed profile")
    })
    .collect()
}
