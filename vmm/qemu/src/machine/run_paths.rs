//! Where a run's files live before QEMU has opened them: the private run directory
//! (named with its owner, swept when the owner is gone) and the guest RAM memfd.

use super::MachineError;
use crate::debris;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// A private directory for sockets and files of one run (mode 0700), in
/// `$XDG_RUNTIME_DIR` (else the temporary directory), named with this process's pid and
/// start time. Run directories (and `/dev/shm` RAM files of older versions) whose owner
/// is gone are removed first.
pub fn run_dir() -> Result<tempfile::TempDir, MachineError> {
    sweep_debris();
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix(&debris::Owner::me().run_dir_prefix())
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(runtime_base())
        .map_err(MachineError::RunDir)
}

/// Where run directories go: `$XDG_RUNTIME_DIR`, else the temporary directory.
pub fn runtime_base() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir)
}

/// Remove what killed runs left: their run directories, and the `/dev/shm` RAM files
/// of older versions. Cheap (two directory listings); every start calls it.
pub fn sweep_debris() {
    debris::sweep_run_dirs(&runtime_base());
    debris::sweep_legacy_ram_files(Path::new("/dev/shm"));
}

/// Guest RAM: an anonymous memfd (no name anywhere in the file system). QEMU inherits
/// it and opens it as `/proc/self/fd/N`; we map it, and the plugin gets it over its socket.
fn ram_memfd() -> Result<OwnedFd, MachineError> {
    // SAFETY: memfd_create takes a NUL-terminated name (a C string literal) and flags;
    // it returns a new descriptor or -1, checked below.
    let fd = unsafe { libc::memfd_create(c"ornament-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MachineError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Files of one run, chosen before QEMU starts.
#[derive(Debug)]
pub struct RunPaths {
    /// Private directory (removed on drop, and as soon as QEMU has started).
    pub dir: tempfile::TempDir,
    /// gdbstub socket.
    pub gdb_socket: PathBuf,
    /// /init's status channel.
    pub status: PathBuf,
    /// Guest RAM (a memfd, close-on-exec; QEMU gets it at spawn).
    pub ram: OwnedFd,
}

impl RunPaths {
    /// Create the private directory and name the files in it, and the RAM memfd.
    pub fn new() -> Result<Self, MachineError> {
        let dir = run_dir()?;
        let gdb_socket = dir.path().join("gdb.sock");
        let status = dir.path().join("status");
        let ram = ram_memfd()?;
        Ok(Self {
            dir,
            gdb_socket,
            status,
            ram,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_paths_are_private_and_removed() {
        let p = RunPaths::new().expect("run dir");
        let dir = p.dir.path().to_path_buf();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir)
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "run dir must be private");
        assert!(p.gdb_socket.starts_with(&dir));
        drop(p);
        assert!(!dir.exists());
    }
}
