//! Paths in the guest: a dentry up to its root, across mounts, and the paths of files and
//! of a task's executable.

use super::{at, Field, TaskReader, Unreadable};
use crate::vmem::VirtMem;
use ornament_engine::Gva;

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

impl TaskReader<'_> {
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

    /// The task's working directory (`task->fs->pwd`) as a path; `None` for a task without
    /// an `fs_struct` (it has exited) or a profile without those offsets.
    pub fn cwd(&self, vm: &VirtMem<'_>, task: Gva) -> Field<Option<String>> {
        let Some(c) = self.off.cwd else {
            return Ok(None);
        };
        let Some(fs) = Self::kptr(vm, at(task, c.task_fs), true)? else {
            return Ok(None);
        };
        let pwd = fs.wrapping_add(c.fs_pwd);
        let dentry = Self::kptr_nonnull(vm, at(pwd, self.off.path_dentry))?;
        let mnt = Self::kptr_nonnull(vm, at(pwd, self.off.path_mnt))?;
        self.file_path(vm, mnt, dentry).map(Some)
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
}
