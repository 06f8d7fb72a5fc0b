//! \[4\] Reading tasks: `TaskReader` (pid, tgid, parent, comm, creds, kernel thread?, exe
//! path, argv, user `pt_regs`) and bounded walks of the task list.
//!
//! Guest memory is hostile: every field that cannot be read becomes
//! `Err(Unreadable { at })`, every walk has a step budget and cycle detection, every
//! string has a cap.
//!
//! Parts: `offsets` (what a reader needs from the profile), the field readers here, paths
//! (`path`: dentries, mounts, files), user space (`user`: address space, argv, `pt_regs`) and
//! walks of the task list (`walk`).

mod offsets;
mod path;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
mod user;
mod walk;

pub use offsets::{CwdOffsets, MountOffsets, TaskOffsets};

use crate::kernel::{is_kernel_address, Kernel};
use crate::profile::ProfileError;
use crate::vmem::VirtMem;
use ornament_engine::Gva;

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
    /// Working directory (`task->fs->pwd`, across mount points); `None` when the task has
    /// no `fs_struct` (it has exited) or the profile lacks its offsets.
    pub cwd: Field<Option<String>>,
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
        self.creds_of(vm, cred)
    }

    /// (uid, gid, euid, egid) of the `struct cred` at `cred`.
    pub fn creds_of(&self, vm: &VirtMem<'_>, cred: Gva) -> Field<[u32; 4]> {
        Ok([
            Self::u32(vm, at(cred, self.off.cred_uid))?,
            Self::u32(vm, at(cred, self.off.cred_gid))?,
            Self::u32(vm, at(cred, self.off.cred_euid))?,
            Self::u32(vm, at(cred, self.off.cred_egid))?,
        ])
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
            cwd: self.cwd(vm, task),
            argv: self.argv(vm, task),
        }
    }
}
