//! The QEMU command line: what a `QemuConfig` becomes, and nothing else.

use std::ffi::OsString;
use std::path::PathBuf;

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation (multi-threaded TCG); works everywhere, needed for plugins.
    Tcg,
    /// Hardware KVM (only where KVM can run an unmodified kernel).
    Kvm,
}

/// Everything QEMU is started with.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// The `qemu-system-x86_64` binary.
    pub binary: PathBuf,
    /// Kernel (bzImage) to boot.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub mem_size_mib: u32,
    /// Accelerator.
    pub accel: Accel,
    /// File backing guest RAM (shared with us).
    pub ram_path: PathBuf,
    /// Unix socket of the gdbstub (QEMU listens).
    pub gdb_socket: PathBuf,
    /// File receiving the second serial port (the /init status channel).
    pub status_path: PathBuf,
    /// Start with vCPUs stopped (`-S`) until the gdbstub says continue.
    pub start_paused: bool,
    /// A TCG plugin: library path and its `key=value` arguments.
    pub plugin: Option<(PathBuf, Vec<String>)>,
}

impl QemuConfig {
    /// A guest to boot: the engine fills in its own plumbing (RAM file, gdbstub socket,
    /// status file, plugin) when it starts QEMU.
    pub fn boot(
        binary: PathBuf,
        kernel: PathBuf,
        initrd: PathBuf,
        cmdline: String,
        vcpus: u32,
        mem_size_mib: u32,
        accel: Accel,
    ) -> Self {
        Self {
            binary,
            kernel,
            initrd,
            cmdline,
            vcpus,
            mem_size_mib,
            accel,
            ram_path: PathBuf::new(),
            gdb_socket: PathBuf::new(),
            status_path: PathBuf::new(),
            start_paused: true,
            plugin: None,
        }
    }

    /// The argument vector (without the binary).
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(OsString::from(s));
        let accel = match self.accel {
            Accel::Tcg => "tcg,thread=multi",
            Accel::Kvm => "kvm",
        };
        push("-M");
        push("pc");
        push("-accel");
        push(accel);
        if self.accel == Accel::Kvm {
            push("-cpu");
            push("host");
        }
        push("-smp");
        push(&self.vcpus.to_string());
        push("-m");
        push(&format!("{}M", self.mem_size_mib));
        push("-object");
        push(&format!(
            "memory-backend-file,id=ornament-ram,size={}M,mem-path={},share=on",
            self.mem_size_mib,
            self.ram_path.display()
        ));
        push("-machine");
        push("memory-backend=ornament-ram");
        for flag in ["-nodefaults", "-no-user-config", "-no-reboot"] {
            push(flag);
        }
        push("-display");
        push("none");
        push("-monitor");
        push("none");
        // ttyS0: the console, on QEMU's stdout (read by us).
        push("-serial");
        push("stdio");
        // ttyS1: /init's status line, to a file only we read.
        push("-serial");
        push(&format!("file:{}", self.status_path.display()));
        push("-chardev");
        push(&format!(
            "socket,id=ornament-gdb,path={},server=on,wait=off",
            self.gdb_socket.display()
        ));
        push("-gdb");
        push("chardev:ornament-gdb");
        if self.start_paused {
            push("-S");
        }
        if let Some((lib, args)) = &self.plugin {
            let mut s = lib.display().to_string();
            for kv in args {
                s.push(',');
                s.push_str(kv);
            }
            push("-plugin");
            push(&s);
        }
        push("-kernel");
        a.push(self.kernel.clone().into_os_string());
        let mut push = |s: &str| a.push(OsString::from(s));
        push("-initrd");
        a.push(self.initrd.clone().into_os_string());
        a.push(OsString::from("-append"));
        a.push(OsString::from(&self.cmdline));
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> QemuConfig {
        QemuConfig {
            binary: "qemu-system-x86_64".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: "console=ttyS0".into(),
            vcpus: 2,
            mem_size_mib: 512,
            accel: Accel::Tcg,
            ram_path: "/dev/shm/r".into(),
            gdb_socket: "/run/g.sock".into(),
            status_path: "/run/status".into(),
            start_paused: true,
            plugin: None,
        }
    }

    fn joined(c: &QemuConfig) -> String {
        c.args()
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn tcg_command_line() {
        let s = joined(&cfg());
        assert!(
            s.starts_with("-M pc -accel tcg,thread=multi -smp 2 -m 512M "),
            "{s}"
        );
        assert!(s.contains(
            "memory-backend-file,id=ornament-ram,size=512M,mem-path=/dev/shm/r,share=on -machine memory-backend=ornament-ram"
        ));
        assert!(s.contains("-serial stdio -serial file:/run/status"));
        assert!(s.contains("socket,id=ornament-gdb,path=/run/g.sock,server=on,wait=off -gdb chardev:ornament-gdb -S"));
        assert!(
            s.ends_with("-kernel /k -initrd /i -append console=ttyS0"),
            "{s}"
        );
        assert!(!s.contains("-cpu host"));
    }

    #[test]
    fn kvm_and_plugin() {
        let mut c = cfg();
        c.accel = Accel::Kvm;
        c.start_paused = false;
        c.plugin = Some(("/p.so".into(), vec!["sock=/s".into()]));
        let s = joined(&c);
        assert!(s.contains("-accel kvm -cpu host"));
        assert!(s.contains("-plugin /p.so,sock=/s"));
        assert!(!s.contains(" -S "));
    }
}
