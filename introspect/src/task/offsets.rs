//! The `task_struct`, `mm_struct`, dentry and mount offsets a task reader needs, resolved
//! once from a profile.

use super::UserRegs;
use crate::profile::{Profile, ProfileError};

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
    /// `task_struct.fs` and `fs_struct.pwd` (the working directory, a `struct path`), where
    /// the profile has them.
    pub cwd: Option<CwdOffsets>,
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

/// Where a task's working directory is: `task->fs->pwd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CwdOffsets {
    /// `task_struct.fs` (NULL once the task has left its `fs_struct` on exit).
    pub task_fs: u64,
    /// `fs_struct.pwd`: the working directory's `struct path`.
    pub fs_pwd: u64,
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
            cwd: t("fs")
                .ok()
                .zip(p.offset("fs_struct", "pwd").ok())
                .map(|(task_fs, fs_pwd)| CwdOffsets { task_fs, fs_pwd }),
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
