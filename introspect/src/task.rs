//! \[4\] Reading tasks: `TaskReader` (pid, tgid, parent, comm, creds, kernel thread?, exe
//! path, argv, user `pt_regs`) and bounded walks of the task list.
//!
//! Guest memory is hostile: every field that cannot be read becomes
//! `Err(Unreadable { at })`, every walk has a step budget and cycle detection, every
//! string has a cap.

use crate::kernel::{is_kernel_address, Kernel};
use crate::paging::PagingMode;
use crate::profile::{Profile, ProfileError};
use crate::vmem::VirtMem;
use ornament_engine::Gva;
use std::collections::HashSet;

/// `PF_KTHREAD` in `task_struct.flags`: the task is a kernel thread.
pub const PF_KTHREAD: u32 = 0x0020_0000;

/// Why a task reader could not be built.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum TaskError {
    /// the profile lacks a field the task reader needs
    Profile(#[from] ProfileError),
}

/// A field that could not be read: the guest address that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreadable {
    /// The address whose read failed (or the bad pointer found there).
    pub at: Gva,
}

/// A field of a task: its value, or where reading it failed.
pub type Field<T> = Result<T, Unreadable>;

/// Caps on what one read may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes of `argv` read (`mm->arg_start..arg_end`).
    pub max_argv_bytes: u64,
    /// Most path components followed up `d_parent`.
    pub max_path_depth: usize,
    /// Most bytes of one path component.
    pub max_name_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_argv_bytes: 32 << 10,
            max_path_depth: 64,
            max_name_bytes: 255,
        }
    }
}

/// Command-line arguments of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Argv {
    /// The arguments (split on NUL, decoded by [`crate::guest_text::decode`]).
    pub args: Vec<String>,
    /// True when the area was longer than the cap, or its tail could not be read.
    pub truncated: bool,
}

impl Argv {
    /// The arguments in the bytes of `mm->arg_start..arg_end` (or a prefix of them: then
    /// `truncated`): split on NUL, each decoded by [`crate::guest_text::decode`]; a final NUL ends the last one.
    pub fn from_bytes(bytes: &[u8], truncated: bool) -> Self {
        let mut args: Vec<String> = bytes
            .split(|&b| b == 0)
            .map(crate::guest_text::decode)
            .collect();
        if bytes.last() == Some(&0) || bytes.is_empty() {
            args.pop();
        }
        Self { args, truncated }
    }
}

/// What is known about one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    /// Address of its `task_struct`.
    pub task: Gva,
    /// Thread id (`task->pid`).
    pub pid: Field<i32>,
    /// Process id (`task->tgid`).
    pub tgid: Field<i32>,
    /// Parent's process id (`task->real_parent->tgid`, as `getppid` answers).
    pub ppid: Field<i32>,
    /// `task->comm`.
    pub comm: Field<String>,
    /// Real user id.
    pub uid: Field<u32>,
    /// Real group id.
    pub gid: Field<u32>,
    /// Effective user id.
    pub euid: Field<u32>,
    /// Effective group id.
    pub egid: Field<u32>,
    /// `PF_KTHREAD` set, or no `mm`.
    pub is_kernel_thread: Field<bool>,
    /// Executable path (`mm->exe_file->f_path.dentry` up to its root); `None` when the
    /// task has no mm or no exe_file.
    pub exe_path: Field<Option<String>>,
    /// Command line; `None` when the task has no mm.
    pub argv: Field<Option<Argv>>,
}

/// The user-mode registers a task saved on entry to the kernel (`struct pt_regs` at the
/// top of its kernel stack).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub struct UserRegs {
    pub di: u64,
    pub si: u64,
    pub dx: u64,
    pub r10: u64,
    pub r8: u64,
    pub r9: u64,
    pub ax: u64,
    /// The syscall number on syscall entry (`-1` otherwise).
    pub orig_ax: u64,
    pub ip: u64,
    pub sp: u64,
    pub cs: u64,
}

impl UserRegs {
    /// `pt_regs` members in the order of [`UserRegs`]' fields.
    pub const MEMBERS: [&'static str; 11] = [
        "di", "si", "dx", "r10", "r8", "r9", "ax", "orig_ax", "ip", "sp", "cs",
    ];

    /// The six syscall arguments (x86-64 syscall ABI: rdi, rsi, rdx, r10, r8, r9).
    pub fn syscall_args(&self) -> [u64; 6] {
        [self.di, self.si, self.dx, self.r10, self.r8, self.r9]
    }

    fn set(&mut self, i: usize, v: u64) {
        let slot = match i {
            0 => &mut self.di,
            1 => &mut self.si,
            2 => &mut self.dx,
            3 => &mut self.r10,
            4 => &mut self.r8,
            5 => &mut self.r9,
            6 => &mut self.ax,
            7 => &mut self.orig_ax,
            8 => &mut self.ip,
            9 => &mut self.sp,
            _ => &mut self.cs,
        };
        *slot = v;
    }

    /// The values in [`UserRegs::MEMBERS`] order.
    pub fn values(&self) -> [u64; 11] {
        [
            self.di,
            self.si,
            self.dx,
            self.r10,
            self.r8,
            self.r9,
            self.ax,
            self.orig_ax,
            self.ip,
            self.sp,
            self.cs,
        ]
    }
}

/// How a task-list walk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkEnd {
    /// Back at the list head.
    Complete,
    /// The step budget ran out.
    BudgetExhausted,
    /// A node was met twice without returning to the head.
    Cycle {
        /// The node met again.
        at: Gva,
    },
    /// A link could not be read, or was not a kernel address.
    Unreadable {
        /// Where.
        at: Gva,
    },
}

/// The tasks found by a walk, in list order, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskWalk {
    /// `task_struct` addresses.
    pub tasks: Vec<Gva>,
    /// Why the walk stopped.
    pub end: WalkEnd,
}

/// The offsets a task reader needs, resolved once from a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct TaskOffsets {
    pub pid: u64,
    pub tgid: u64,
    pub comm: u64,
    pub comm_size: u64,
    pub real_parent: u64,
    pub flags: u64,
    pub mm: u64,
    pub cred: u64,
    pub tasks: u64,
    pub stack: u64,
    pub signal: u64,
    /// `task_struct.thread_node` (absent in some kernels).
    pub thread_node: Option<u64>,
    /// `signal_struct.thread_head` (absent in some kernels).
    pub thread_head: Option<u64>,
    pub mm_pgd: u64,
    pub mm_arg_start: u64,
    pub mm_arg_end: u64,
    pub mm_exe_file: u64,
    pub cred_uid: u64,
    pub cred_gid: u64,
    pub cred_euid: u64,
    pub cred_egid: u64,
    pub file_f_path: u64,
    pub path_dentry: u64,
    pub path_mnt: u64,
    /// The mount tree, where the profile has it: paths then cross mount points.
    pub mounts: Option<MountOffsets>,
    /// `dentry.d_hash.pprev` (NULL for an unhashed, i.e. deleted, dentry), where the
    /// profile has it.
    pub dentry_d_hash_pprev: Option<u64>,
    pub dentry_d_name: u64,
    pub dentry_d_parent: u64,
    pub qstr_name: u64,
    pub qstr_len: u64,
    pub pt_regs_size: u64,
    /// (offset, size) of each of [`UserRegs::MEMBERS`] in `pt_regs`.
    pub pt_regs: [(u64, u64); 11],
    pub thread_size: u64,
}

/// Offsets of the mount tree (`struct mount` of fs/mount.h, and `struct vfsmount`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountOffsets {
    /// `mount.mnt`: the `vfsmount` embedded in its `mount` (`real_mount()`).
    pub mnt: u64,
    /// `mount.mnt_parent`: the mount this one is mounted on (itself at the root).
    pub mnt_parent: u64,
    /// `mount.mnt_mountpoint`: the dentry it is mounted on, in the parent mount.
    pub mnt_mountpoint: u64,
    /// `vfsmount.mnt_root`: the root dentry of the mounted tree.
    pub mnt_root: u64,
}

impl MountOffsets {
    fn from_profile(p: &Profile) -> Option<Self> {
        Some(Self {
            mnt: p.offset("mount", "mnt").ok()?,
            mnt_parent: p.offset("mount", "mnt_parent").ok()?,
            mnt_mountpoint: p.offset("mount", "mnt_mountpoint").ok()?,
            mnt_root: p.offset("vfsmount", "mnt_root").ok()?,
        })
    }
}

impl TaskOffsets {
    /// Resolve from `profile`; names the first missing field.
    pub fn from_profile(p: &Profile) -> Result<Self, ProfileError> {
        let t = |m| p.offset("task_struct", m);
        Ok(Self {
            pid: t("pid")?,
            tgid: t("tgid")?,
            comm: t("comm")?,
            comm_size: p.field("task_struct", "comm")?.size,
            real_parent: t("real_parent")?,
            flags: t("flags")?,
            mm: t("mm")?,
            cred: t("cred")?,
            tasks: t("tasks")?,
            stack: t("stack")?,
            signal: t("signal")?,
            thread_node: t("thread_node").ok(),
            thread_head: p.offset("signal_struct", "thread_head").ok(),
            mm_pgd: p.offset("mm_struct", "pgd")?,
            mm_arg_start: p.offset("mm_struct", "arg_start")?,
            mm_arg_end: p.offset("mm_struct", "arg_end")?,
            mm_exe_file: p.offset("mm_struct", "exe_file")?,
            cred_uid: p.offset("cred", "uid")?,
            cred_gid: p.offset("cred", "gid")?,
            cred_euid: p.offset("cred", "euid")?,
            cred_egid: p.offset("cred", "egid")?,
            file_f_path: p.offset("file", "f_path")?,
            path_dentry: p.offset("path", "dentry")?,
            path_mnt: p.offset("path", "mnt")?,
            mounts: MountOffsets::from_profile(p),
            dentry_d_hash_pprev: p
                .offset("dentry", "d_hash")
                .ok()
                .zip(p.offset("hlist_bl_node", "pprev").ok())
                .map(|(h, pp)| h + pp),
            dentry_d_name: p.offset("dentry", "d_name")?,
            dentry_d_parent: p.offset("dentry", "d_parent")?,
            qstr_name: p.offset("qstr", "name")?,
            qstr_len: p.offset("qstr", "len")?,
            pt_regs_size: p.structs.get("pt_regs").map(|s| s.size).ok_or_else(|| {
                ProfileError::NoField {
                    release: p.kernel.release.clone(),
                    strukt: "pt_regs".into(),
                    member: "<size>".into(),
                }
            })?,
            pt_regs: {
                let mut r = [(0, 8); 11];
                for (slot, m) in r.iter_mut().zip(UserRegs::MEMBERS) {
                    let f = p.field("pt_regs", m)?;
                    *slot = (f.offset, f.size);
                }
                r
            },
            thread_size: p.thread_size,
        })
    }
}

/// `/a/b/c` from the components leaf first (`["c", "b", "a"]`); `/` for none.
fn join_path(mut names: Vec<String>) -> String {
    if names.is_empty() {
        return "/".into();
    }
    names.reverse();
    names.iter().fold(String::new(), |mut acc, n| {
        acc.push('/');
        acc.push_str(n);
        acc
    })
}

/// Reads tasks of one kernel.
#[derive(Debug)]
pub struct TaskReader<'k> {
    kernel: &'k Kernel<'k>,
    off: TaskOffsets,
    limits: Limits,
}

fn at(base: Gva, off: u64) -> Gva {
    base.wrapping_add(off)
}

impl<'k> TaskReader<'k> {
    /// A reader for `kernel`, with default [`Limits`].
    pub fn new(kernel: &'k Kernel<'k>) -> Result<Self, TaskError> {
        Ok(Self {
            kernel,
            off: TaskOffsets::from_profile(kernel.profile())?,
            limits: Limits::default(),
        })
    }

    /// A reader for `kernel` from offsets resolved earlier (no profile lookups: for a
    /// reader made per probe hit).
    pub fn from_offsets(kernel: &'k Kernel<'k>, off: TaskOffsets, limits: Limits) -> Self {
        Self {
            kernel,
            off,
            limits,
        }
    }

    /// The same reader with other limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The resolved offsets.
    pub fn offsets(&self) -> &TaskOffsets {
        &self.off
    }

    fn u32(vm: &VirtMem<'_>, a: Gva) -> Field<u32> {
        vm.read_u32(a).map_err(|_| Unreadable { at: a })
    }

    fn i32(vm: &VirtMem<'_>, a: Gva) -> Field<i32> {
        vm.read_i32(a).map_err(|_| Unreadable { at: a })
    }

    /// A pointer that must be a kernel address (NULL allowed when `nullable`).
    fn kptr(vm: &VirtMem<'_>, a: Gva, nullable: bool) -> Field<Option<Gva>> {
        let p = vm.read_ptr(a).map_err(|_| Unreadable { at: a })?;
        if p.raw() == 0 && nullable {
            return Ok(None);
        }
        if !is_kernel_address(p) {
            return Err(Unreadable { at: a });
        }
        Ok(Some(p))
    }

    fn kptr_nonnull(vm: &VirtMem<'_>, a: Gva) -> Field<Gva> {
        Self::kptr(vm, a, false)?.ok_or(Unreadable { at: a })
    }

    /// `task->pid`.
    pub fn pid(&self, vm: &VirtMem<'_>, task: Gva) -> Field<i32> {
        Self::i32(vm, at(task, self.off.pid))
    }

    /// `task->tgid`.
    pub fn tgid(&self, vm: &VirtMem<'_>, task: Gva) -> Field<i32> {
        Self::i32(vm, at(task, self.off.tgid))
    }

    /// `task->real_parent`.
    pub fn real_parent(&self, vm: &VirtMem<'_>, task: Gva) -> Field<Gva> {
        Self::kptr_nonnull(vm, at(task, self.off.real_parent))
    }

    /// `task->real_parent->tgid`.
    pub fn ppid(&self, vm: &VirtMem<'_>, task: Gva) -> Field<i32> {
        let parent = self.real_parent(vm, task)?;
        self.tgid(vm, parent)
    }

    /// `task->comm`.
    pub fn comm(&self, vm: &VirtMem<'_>, task: Gva) -> Field<String> {
        let a = at(task, self.off.comm);
        let max = usize::try_from(self.off.comm_size).unwrap_or(16);
        vm.read_cstr(a, max)
            .map(|s| s.text)
            .map_err(|_| Unreadable { at: a })
    }

    /// `task->signal` (the thread group's `signal_struct`).
    pub fn signal_struct(&self, vm: &VirtMem<'_>, task: Gva) -> Field<Gva> {
        Self::kptr_nonnull(vm, at(task, self.off.signal))
    }

    /// `task->mm` (`None` for kernel threads).
    pub fn mm(&self, vm: &VirtMem<'_>, task: Gva) -> Field<Option<Gva>> {
        Self::kptr(vm, at(task, self.off.mm), true)
    }

    /// `PF_KTHREAD` set in `task->flags`, or no mm.
    pub fn is_kernel_thread(&self, vm: &VirtMem<'_>, task: Gva) -> Field<bool> {
        let flags = Self::u32(vm, at(task, self.off.flags))?;
        if flags & PF_KTHREAD != 0 {
            return Ok(true);
        }
        Ok(self.mm(vm, task)?.is_none())
    }

    /// (uid, gid, euid, egid) from `task->cred`.
    pub fn creds(&self, vm: &VirtMem<'_>, task: Gva) -> Field<[u32; 4]> {
        let cred = Self::kptr_nonnull(vm, at(task, self.off.cred))?;
        Ok([
            Self::u32(vm, at(cred, self.off.cred_uid))?,
            Self::u32(vm, at(cred, self.off.cred_gid))?,
            Self::u32(vm, at(cred, self.off.cred_euid))?,
            Self::u32(vm, at(cred, self.off.cred_egid))?,
        ])
    }

    /// Path of a dentry, following `d_parent` to the root of its file system (mount
    /// points are not crossed: for the initramfs root file system this is the full path;
    /// [`TaskReader::file_path`] crosses them).
    pub fn dentry_path(&self, vm: &VirtMem<'_>, dentry: Gva) -> Field<String> {
        let mut names = Vec::new();
        let mut cur = dentry;
        loop {
            let parent = Self::kptr_nonnull(vm, at(cur, self.off.dentry_d_parent))?;
            if parent == cur {
                break;
            }
            if names.len() >= self.limits.max_path_depth {
                // Deeper than the cap, or a d_parent cycle: no trustworthy path.
                return Err(Unreadable { at: cur });
            }
            names.push(self.dentry_name(vm, cur)?);
            cur = parent;
        }
        Ok(join_path(names))
    }

    /// A dentry's own name (`d_name`), capped.
    fn dentry_name(&self, vm: &VirtMem<'_>, dentry: Gva) -> Field<String> {
        let qstr = at(dentry, self.off.dentry_d_name);
        let len = Self::u32(vm, at(qstr, self.off.qstr_len))?;
        let name = Self::kptr_nonnull(vm, at(qstr, self.off.qstr_name))?;
        let cap = usize::try_from(len)
            .unwrap_or(usize::MAX)
            .min(self.limits.max_name_bytes);
        vm.read_cstr(name, cap)
            .map(|s| s.text)
            .map_err(|_| Unreadable { at: name })
    }

    /// The path of a file (`struct path`: a `vfsmount` and a dentry) as the kernel's
    /// `d_path` gives it from the root of the mount tree: mount points are crossed
    /// (`/tmp/x` on a tmpfs at `/tmp`), a deleted file ends in ` (deleted)`, and a file
    /// with no name in any tree (a memfd, an anonymous file) is `/NAME (deleted)`, as
    /// the kernel's `simple_dname` names it (`/memfd:NAME (deleted)`). Without the mount
    /// offsets in the profile, the path within the file's own file system
    /// ([`TaskReader::dentry_path`]).
    pub fn file_path(&self, vm: &VirtMem<'_>, vfsmount: Gva, dentry: Gva) -> Field<String> {
        let Some(mo) = self.off.mounts else {
            return self.dentry_path(vm, dentry);
        };
        let root_of = |m: Gva| Self::kptr_nonnull(vm, at(m, mo.mnt_root));
        let is_root = |d: Gva| -> Field<bool> {
            Ok(Self::kptr_nonnull(vm, at(d, self.off.dentry_d_parent))? == d)
        };
        let unhashed = match self.off.dentry_d_hash_pprev {
            Some(o) => Self::kptr(vm, at(dentry, o), true)?.is_none(),
            None => false,
        };
        if is_root(dentry)? && dentry != root_of(vfsmount)? {
            return Ok(format!("/{} (deleted)", self.dentry_name(vm, dentry)?));
        }
        let mut names = Vec::new();
        let (mut mnt, mut cur) = (vfsmount, dentry);
        // Each step either names a component or climbs one mount: both bounded.
        for _ in 0..self.limits.max_path_depth.saturating_mul(2) {
            if cur == root_of(mnt)? {
                let mount = mnt.wrapping_sub(mo.mnt);
                let parent = Self::kptr_nonnull(vm, at(mount, mo.mnt_parent))?;
                if parent == mount {
                    // The root of the mount tree.
                    let mut path = join_path(names);
                    if unhashed && !is_root(dentry)? {
                        path.push_str(" (deleted)");
                    }
                    return Ok(path);
                }
                cur = Self::kptr_nonnull(vm, at(mount, mo.mnt_mountpoint))?;
                mnt = parent.wrapping_add(mo.mnt);
                continue;
            }
            let parent = Self::kptr_nonnull(vm, at(cur, self.off.dentry_d_parent))?;
            if parent == cur || names.len() >= self.limits.max_path_depth {
                // A root that is not its mount's (the kernel's d_path stops there too,
                // with an unreachable path), deeper than the cap, or a cycle: no
                // trustworthy path.
                return Err(Unreadable { at: cur });
            }
            names.push(self.dentry_name(vm, cur)?);
            cur = parent;
        }
        Err(Unreadable { at: cur })
    }

    /// `mm->exe_file->f_path.dentry`, as a path.
    pub fn exe_path(&self, vm: &VirtMem<'_>, task: Gva) -> Field<Option<String>> {
        let Some(mm) = self.mm(vm, task)? else {
            return Ok(None);
        };
        let Some(file) = Self::kptr(vm, at(mm, self.off.mm_exe_file), true)? else {
            return Ok(None);
        };
        self.path_of_file(vm, file).map(Some)
    }

    /// `file->f_path` as a path ([`TaskReader::file_path`]).
    pub fn path_of_file(&self, vm: &VirtMem<'_>, file: Gva) -> Field<String> {
        let dentry = Self::kptr_nonnull(vm, at(file, self.off.file_f_path + self.off.path_dentry))?;
        if self.off.mounts.is_none() {
            return self.dentry_path(vm, dentry);
        }
        let mnt = Self::kptr_nonnull(vm, at(file, self.off.file_f_path + self.off.path_mnt))?;
        self.file_path(vm, mnt, dentry)
    }

    /// `file->f_path` as a path, only if the file still points at `dentry`.
    pub fn path_of_file_at(&self, vm: &VirtMem<'_>, file: Gva, dentry: Gva) -> Field<String> {
        let now = Self::kptr_nonnull(vm, at(file, self.off.file_f_path + self.off.path_dentry))?;
        if now != dentry {
            return Err(Unreadable { at: file });
        }
        self.path_of_file(vm, file)
    }

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

    /// Everything in [`TaskInfo`].
    pub fn read(&self, vm: &VirtMem<'_>, task: Gva) -> TaskInfo {
        let creds = self.creds(vm, task);
        let pick = |i: usize| creds.map(|c| c[i]);
        TaskInfo {
            task,
            pid: self.pid(vm, task),
            tgid: self.tgid(vm, task),
            ppid: self.ppid(vm, task),
            comm: self.comm(vm, task),
            uid: pick(0),
            gid: pick(1),
            euid: pick(2),
            egid: pick(3),
            is_kernel_thread: self.is_kernel_thread(vm, task),
            exe_path: self.exe_path(vm, task),
            argv: self.argv(vm, task),
        }
    }

    /// Walk a circular `list_head` list whose nodes sit at `node_off` in each element,
    /// from the head at `head` (not itself an element), for at most `budget` elements.
    fn walk_list(&self, vm: &VirtMem<'_>, head: Gva, node_off: u64, budget: usize) -> TaskWalk {
        let mut tasks = Vec::new();
        let mut seen = HashSet::new();
        let mut cur = head;
        loop {
            let next = match Self::kptr_nonnull(vm, cur) {
                Ok(n) => n,
                Err(u) => {
                    return TaskWalk {
                        tasks,
                        end: WalkEnd::Unreadable { at: u.at },
                    }
                }
            };
            if next == head {
                return TaskWalk {
                    tasks,
                    end: WalkEnd::Complete,
                };
            }
            if !seen.insert(next) {
                return TaskWalk {
                    tasks,
                    end: WalkEnd::Cycle { at: next },
                };
            }
            if vm.read_u64(next).is_err() {
                return TaskWalk {
                    tasks,
                    end: WalkEnd::Unreadable { at: next },
                };
            }
            if tasks.len() >= budget {
                return TaskWalk {
                    tasks,
                    end: WalkEnd::BudgetExhausted,
                };
            }
            tasks.push(next.wrapping_sub(node_off));
            cur = next;
        }
    }

    /// Every process (thread-group leader) on `init_task.tasks`, as `for_each_process`
    /// sees them (`init_task` itself, pid 0, is not included), at most `budget`.
    pub fn processes(&self, vm: &VirtMem<'_>, budget: usize) -> Result<TaskWalk, TaskError> {
        let init = self.kernel.symbol("init_task").map_err(|e| match e {
            crate::kernel::KernelError::Profile(p) => TaskError::Profile(p),
            _ => TaskError::Profile(ProfileError::NoSymbol {
                release: self.kernel.profile().kernel.release.clone(),
                name: "init_task".into(),
            }),
        })?;
        Ok(self.walk_list(vm, at(init, self.off.tasks), self.off.tasks, budget))
    }

    /// The threads of `task`'s thread group (`signal->thread_head`, linked through
    /// `thread_node`); `None` when the kernel has no such lists.
    pub fn threads(&self, vm: &VirtMem<'_>, task: Gva, budget: usize) -> Option<TaskWalk> {
        let (node, head) = (self.off.thread_node?, self.off.thread_head?);
        let signal = match Self::kptr_nonnull(vm, at(task, self.off.signal)) {
            Ok(s) => s,
            Err(u) => {
                return Some(TaskWalk {
                    tasks: Vec::new(),
                    end: WalkEnd::Unreadable { at: u.at },
                })
            }
        };
        Some(self.walk_list(vm, at(signal, head), node, budget))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kaslr::{detect, Anchor};
    use crate::testing::{committed_profiles, SynthConfig, SynthGuest, TaskSpec, USER_ARGS};

    struct World {
        g: SynthGuest,
        kthreadd: Gva,
        init: Gva,
        child: Gva,
    }

    fn world(profile: Profile, mode: PagingMode) -> World {
        let cfg = SynthConfig {
            mode,
            ..SynthConfig::default()
        };
        let mut g = SynthGuest::new(profile, cfg).expect("guest");
        let kthreadd = g
            .add_task(&TaskSpec::kthread(2, "kthreadd"))
            .expect("kthreadd");
        let init = g
            .add_task(&TaskSpec::user(1, "init", "/sbin/init", &["/sbin/init"]))
            .expect("init");
        let mut spec = TaskSpec::user(
            42,
            "a-very-long-command-name",
            "/usr/bin/env",
            &["sh", "-c", "echo hi"],
        );
        spec.parent = Some(init);
        spec.creds = [1000, 1001, 1002, 1003];
        let child = g.add_task(&spec).expect("child");
        g.set_current(1, child).expect("current");
        World {
            g,
            kthreadd,
            init,
            child,
        }
    }

    fn each_world(f: impl Fn(&World)) {
        for p in committed_profiles() {
            for mode in [PagingMode::Level4, PagingMode::Level5] {
                f(&world(p.clone(), mode));
            }
        }
    }

    #[test]
    fn reads_tasks_exactly_as_written() {
        each_world(|w| {
            let g = &w.g;
            let regs = g.regs_kernel(
                1,
                g.layout
                    .virt(g.profile.symbol("do_syscall_64").expect("sym")),
            );
            let layout = detect(
                &g.phys.mem,
                &g.profile,
                &regs,
                Anchor::AtSymbol {
                    name: "do_syscall_64",
                    rip: regs.rip,
                },
            )
            .expect("layout");
            assert_eq!(layout, g.layout);
            let k = Kernel::new(&g.phys.mem, &g.profile, layout);
            assert_eq!(k.current_task(&regs).expect("current"), w.child);
            // From user mode: PTI user CR3, per-CPU base in kernel_gs_base.
            assert_eq!(k.current_task(&g.regs_user(1)).expect("user"), w.child);
            assert_eq!(
                k.current_task(&g.regs_kernel(0, Gva(0))).expect("cpu0"),
                g.init_task().expect("init_task")
            );
            let r = TaskReader::new(&k).expect("reader");
            let vm = k.kernel_vm(&regs);
            let info = r.read(&vm, w.child);
            assert_eq!(
                info,
                TaskInfo {
                    task: w.child,
                    pid: Ok(42),
                    tgid: Ok(42),
                    ppid: Ok(1),
                    comm: Ok("a-very-long-com".into()),
                    uid: Ok(1000),
                    gid: Ok(1001),
                    euid: Ok(1002),
                    egid: Ok(1003),
                    is_kernel_thread: Ok(false),
                    exe_path: Ok(Some("/usr/bin/env".into())),
                    argv: Ok(Some(Argv {
                        args: vec!["sh".into(), "-c".into(), "echo hi".into()],
                        truncated: false
                    })),
                }
            );
            let kt = r.read(&vm, w.kthreadd);
            assert_eq!(kt.is_kernel_thread, Ok(true));
            assert_eq!(kt.exe_path, Ok(None));
            assert_eq!(kt.argv, Ok(None));
            assert_eq!(kt.ppid, Ok(0));
            assert_eq!(kt.comm, Ok("kthreadd".into()));
            assert_eq!(r.read(&vm, w.init).exe_path, Ok(Some("/sbin/init".into())));
            let walk = r.processes(&vm, 100).expect("walk");
            assert_eq!(walk.tasks, vec![w.kthreadd, w.init, w.child]);
            assert_eq!(walk.end, WalkEnd::Complete);
            let want = UserRegs {
                di: 1,
                si: 2,
                dx: 3,
                r10: 4,
                r8: 5,
                r9: 6,
                ax: u64::MAX - 37,
                orig_ax: 110,
                ip: 0x40_1234,
                sp: 0x7ffc_0000_1000,
                cs: 0x33,
            };
            g.write_user_regs(w.child, &want).expect("pt_regs");
            assert_eq!(r.user_regs(&vm, w.child), Ok(want));
            assert_eq!(want.syscall_args(), [1, 2, 3, 4, 5, 6]);
            let stack_off = g.off("task_struct", "stack").expect("stack");
            let stack = vm.read_ptr(w.child.wrapping_add(stack_off)).expect("stack");
            assert_eq!(
                r.user_regs_addr(&vm, w.child),
                Ok(stack.wrapping_add(16384 - 0xa8))
            );
        });
    }

    #[test]
    fn hostile_lists_end_cleanly() {
        let p = committed_profiles().remove(0);
        let w = world(p, PagingMode::Level4);
        let g = &w.g;
        let k = Kernel::new(&g.phys.mem, &g.profile, g.layout);
        let r = TaskReader::new(&k).expect("reader");
        let regs = g.regs_kernel(0, Gva(0));
        let vm = k.kernel_vm(&regs);
        let tasks = r.offsets().tasks;
        let budget = r.processes(&vm, 2).expect("walk");
        assert_eq!(budget.tasks, vec![w.kthreadd, w.init]);
        assert_eq!(budget.end, WalkEnd::BudgetExhausted);
        // child.tasks.next -> init.tasks: a cycle that never returns to the head.
        let child_next = w.child.wrapping_add(tasks);
        g.write_u64(child_next, w.init.wrapping_add(tasks).raw())
            .expect("w");
        let cyc = r.processes(&vm, 1000).expect("walk");
        assert_eq!(cyc.tasks, vec![w.kthreadd, w.init, w.child]);
        assert_eq!(
            cyc.end,
            WalkEnd::Cycle {
                at: w.init.wrapping_add(tasks)
            }
        );
        // A pointer into nowhere (direct map beyond RAM) and a non-canonical one.
        for bad in [0xffff_8880_3000_0000u64, 0x8000_0000_0000_0000, 0] {
            g.write_u64(child_next, bad).expect("w");
            let walk = r.processes(&vm, 1000).expect("walk");
            assert_eq!(walk.tasks.len(), 3);
            let end = if bad == 0xffff_8880_3000_0000 {
                WalkEnd::Unreadable { at: Gva(bad) }
            } else {
                WalkEnd::Unreadable { at: child_next }
            };
            assert_eq!(walk.end, end, "{bad:#x}");
            // Reading a task at that address gives Unreadable fields, not panics.
            let info = r.read(&vm, Gva(bad));
            assert!(info.pid.is_err() && info.comm.is_err() && info.argv.is_err());
        }
    }

    #[test]
    fn hostile_task_fields() {
        let p = committed_profiles().remove(1);
        let w = world(p, PagingMode::Level4);
        let g = &w.g;
        let k = Kernel::new(&g.phys.mem, &g.profile, g.layout);
        let r = TaskReader::new(&k).expect("reader");
        let vm = k.kernel_vm(&g.regs_kernel(0, Gva(0)));
        let mm = r.mm(&vm, w.child).expect("mm").expect("has mm");
        let arg_end = mm.wrapping_add(r.offsets().mm_arg_end);
        // Huge length: capped, the unreadable tail marks it truncated.
        g.write_u64(arg_end, USER_ARGS + (1 << 40)).expect("w");
        let a = r.argv(&vm, w.child).expect("argv").expect("some");
        assert!(a.truncated);
        assert_eq!(&a.args[..3], &["sh", "-c", "echo hi"]);
        // End before start.
        g.write_u64(arg_end, USER_ARGS - 1).expect("w");
        assert_eq!(r.argv(&vm, w.child), Err(Unreadable { at: arg_end }));
        // Small cap: truncated.
        g.write_u64(arg_end, USER_ARGS + 14).expect("w");
        let small = TaskReader::new(&k).expect("r").with_limits(Limits {
            max_argv_bytes: 5,
            ..Limits::default()
        });
        assert_eq!(
            small.argv(&vm, w.child),
            Ok(Some(Argv {
                args: vec!["sh".into(), "-c".into()],
                truncated: true
            }))
        );
        // comm with no NUL: capped at the field size.
        let comm = w.child.wrapping_add(r.offsets().comm);
        g.write(comm, &[b'x'; 16]).expect("w");
        assert_eq!(r.comm(&vm, w.child), Ok("x".repeat(16)));
        // A d_parent cycle: bounded, unreadable.
        let file = vm
            .read_ptr(mm.wrapping_add(r.offsets().mm_exe_file))
            .expect("file");
        let dentry = vm
            .read_ptr(file.wrapping_add(r.offsets().file_f_path + r.offsets().path_dentry))
            .expect("dentry");
        let parent_at = dentry.wrapping_add(r.offsets().dentry_d_parent);
        let parent = vm.read_ptr(parent_at).expect("parent");
        g.write_u64(
            parent.wrapping_add(r.offsets().dentry_d_parent),
            dentry.raw(),
        )
        .expect("w");
        assert!(r.exe_path(&vm, w.child).is_err());
        // A non-kernel cred pointer.
        let cred = w.child.wrapping_add(r.offsets().cred);
        g.write_u64(cred, 0x1234).expect("w");
        assert_eq!(r.creds(&vm, w.child), Err(Unreadable { at: cred }));
        // A task whose mm is NULL but lacks PF_KTHREAD still counts as a kernel thread.
        g.write_u64(w.child.wrapping_add(r.offsets().mm), 0)
            .expect("w");
        assert_eq!(r.is_kernel_thread(&vm, w.child), Ok(true));
    }

    /// A three-thread group (leader `init`, threads 43 and 44) linked the kernel's way:
    /// `signal->thread_head` through each task's `thread_node`. Any member lists the
    /// whole group in list order; the budget, a cycle and a bad link end the walk.
    #[test]
    fn file_paths_cross_mounts_and_name_deleted_and_memfd_files() {
        for p in committed_profiles() {
            let mut g = SynthGuest::new(p, SynthConfig::default()).expect("guest");
            // / (the root mount), /tmp a directory on it, a tmpfs mounted there.
            let root = g.add_dentry(None, "/", false).expect("root");
            let tmp = g.add_dentry(Some(root), "tmp", false).expect("tmp");
            let root_mnt = g.add_mount(None, root).expect("root mount");
            let tmpfs_root = g.add_dentry(None, "/", false).expect("tmpfs root");
            let tmpfs = g
                .add_mount(Some((root_mnt, tmp)), tmpfs_root)
                .expect("tmpfs");
            let evil = g.add_dentry(Some(tmpfs_root), "evil", false).expect("evil");
            let gone = g.add_dentry(Some(tmpfs_root), "gone", true).expect("gone");
            // A memfd: a root dentry of its own on an internal mount whose root it is not.
            let shm_root = g.add_dentry(None, "/", false).expect("shm root");
            let shm = g.add_mount(None, shm_root).expect("shm");
            let memfd = g.add_dentry(None, "memfd:payload", true).expect("memfd");
            let files = [
                (g.add_file(tmpfs, evil).expect("f"), "/tmp/evil"),
                (g.add_file(tmpfs, gone).expect("f"), "/tmp/gone (deleted)"),
                (
                    g.add_file(shm, memfd).expect("f"),
                    "/memfd:payload (deleted)",
                ),
                (g.add_file(root_mnt, tmp).expect("f"), "/tmp"),
                (g.add_file(tmpfs, tmpfs_root).expect("f"), "/tmp"),
                (g.add_file(root_mnt, root).expect("f"), "/"),
            ];
            // Two mounts each mounted on the other's root: a cycle, bounded, unreadable.
            let (ra, rb) = (
                g.add_dentry(None, "/", false).expect("a"),
                g.add_dentry(None, "/", false).expect("b"),
            );
            let a = g.add_mount(None, ra).expect("mount a");
            let b = g.add_mount(Some((a, ra)), rb).expect("mount b");
            let mo = TaskOffsets::from_profile(&g.profile)
                .expect("offsets")
                .mounts
                .expect("the profile has the mount tree");
            let mount_a = a.wrapping_sub(mo.mnt);
            let mount_b = b.wrapping_sub(mo.mnt);
            g.write(
                mount_a.wrapping_add(mo.mnt_parent),
                &mount_b.raw().to_le_bytes(),
            )
            .expect("w");
            g.write(
                mount_a.wrapping_add(mo.mnt_mountpoint),
                &rb.raw().to_le_bytes(),
            )
            .expect("w");
            let looped = g.add_file(a, ra).expect("f");
            let k = Kernel::new(&g.phys.mem, &g.profile, g.layout);
            let r = TaskReader::new(&k).expect("reader");
            let vm = k.kernel_vm(&g.regs_kernel(0, Gva(0)));
            for (file, want) in files {
                assert_eq!(r.path_of_file(&vm, file).as_deref(), Ok(want));
            }
            assert!(r.path_of_file(&vm, looped).is_err());
        }
    }

    #[test]
    fn threads_of_a_group() {
        for p in committed_profiles() {
            let release = p.kernel.release.clone();
            let mut w = world(p, PagingMode::Level4);
            let sig_off = w.g.off("task_struct", "signal").expect("signal");
            let node = w.g.off("task_struct", "thread_node").expect("thread_node");
            let head =
                w.g.off("signal_struct", "thread_head")
                    .expect("thread_head");
            let mut thread = |pid| {
                let mut spec = TaskSpec::user(pid, "worker", "/sbin/init", &["/sbin/init"]);
                spec.tgid = 1;
                w.g.add_task(&spec).expect("thread")
            };
            let (t43, t44) = (thread(43), thread(44));
            let signal = w.g.alloc(4096).expect("signal");
            let head_at = signal.wrapping_add(head);
            let group = [w.init, t43, t44];
            // head -> init -> 43 -> 44 -> head (next pointers; the walk reads only those).
            let mut prev = head_at;
            for t in group {
                let n = t.wrapping_add(node);
                w.g.write_u64(prev, n.raw()).expect("w");
                w.g.write_u64(t.wrapping_add(sig_off), signal.raw())
                    .expect("w");
                prev = n;
            }
            w.g.write_u64(prev, head_at.raw()).expect("w");
            let walk = |g: &SynthGuest, from: Gva, budget: usize| {
                let k = Kernel::new(&g.phys.mem, &g.profile, g.layout);
                let r = TaskReader::new(&k).expect("reader");
                let vm = k.kernel_vm(&g.regs_kernel(0, Gva(0)));
                r.threads(&vm, from, budget).expect("supported")
            };
            for member in group {
                let t = walk(&w.g, member, 10);
                assert_eq!(t.tasks, group.to_vec(), "{release}");
                assert_eq!(t.end, WalkEnd::Complete, "{release}");
            }
            let t = walk(&w.g, t44, 2);
            assert_eq!(t.tasks, group[..2].to_vec(), "{release}");
            assert_eq!(t.end, WalkEnd::BudgetExhausted, "{release}");
            // 44 points back at 43: a cycle, reported at the node met again.
            let n43 = t43.wrapping_add(node);
            w.g.write_u64(t44.wrapping_add(node), n43.raw()).expect("w");
            let t = walk(&w.g, w.init, 10);
            assert_eq!(t.tasks, group.to_vec(), "{release}");
            assert_eq!(t.end, WalkEnd::Cycle { at: n43 }, "{release}");
            // 43's link is a user address: unreadable there.
            w.g.write_u64(n43, 0x1000).expect("w");
            let t = walk(&w.g, w.init, 10);
            assert_eq!(t.tasks, group[..2].to_vec(), "{release}");
            assert_eq!(t.end, WalkEnd::Unreadable { at: n43 }, "{release}");
            // The task of another group: its own signal, empty list (head -> head).
            let other = w.g.alloc(4096).expect("signal");
            let other_head = other.wrapping_add(head);
            w.g.write_u64(other_head, other_head.raw()).expect("w");
            w.g.write_u64(w.child.wrapping_add(sig_off), other.raw())
                .expect("w");
            let t = walk(&w.g, w.child, 10);
            assert_eq!((t.tasks, t.end), (vec![], WalkEnd::Complete), "{release}");
        }
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use crate::testing::{committed_profiles, SynthConfig, SynthGuest, TaskSpec};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Random bytes over a task_struct, its mm and a dentry never make a reader panic.
        #[test]
        fn random_guest_bytes_never_panic(
            junk in proptest::collection::vec(any::<u8>(), 1..2048),
            task_at in 0u64..0x2000,
            mm_at in 0u64..0x400,
            walk_budget in 0usize..8,
        ) {
            let p = committed_profiles().remove(0);
            let mut g = SynthGuest::new(p, SynthConfig::default()).expect("guest");
            let t = g.add_task(&TaskSpec::user(7, "x", "/bin/x", &["x", "y"])).expect("task");
            let k = Kernel::new(&g.phys.mem, &g.profile, g.layout);
            let r = TaskReader::new(&k).expect("reader");
            let vm = k.kernel_vm(&g.regs_kernel(0, Gva(0)));
            let mm = r.mm(&vm, t).expect("mm").expect("some");
            g.write(t.wrapping_add(task_at), &junk).expect("w");
            g.write(mm.wrapping_add(mm_at), &junk).expect("w");
            let _ = r.read(&vm, t);
            let _ = r.user_regs_addr(&vm, t);
            let _ = r.threads(&vm, t, walk_budget);
            let w = r.processes(&vm, walk_budget).expect("walk");
            prop_assert!(w.tasks.len() <= walk_budget);
        }
    }
}
