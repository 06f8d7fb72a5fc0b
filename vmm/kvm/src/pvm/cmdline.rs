//! The guest kernel command line of compatibility mode, and the TSC rate it slows the guest's
//! clock by.

/// Kernel command-line arguments PVM compatibility mode appends (measured needs plus
/// speed levers): `noxsave` (the emulator lacks `xrstor`), `clearcpuid=137` (SSSE3,
/// which the emulator lacks), `308` (SMAP: no `clac`/`stac` to complete), `151`
/// (POPCNT), `cryptomgr.notests` (minutes of emulated self-tests), `nokaslr` (fixed
/// addresses for System.map), `pci=off`, `nowatchdog`, `mitigations=off` (no return
/// thunks, retpolines or page-table isolation: far fewer emulated instructions, about
/// 2x faster to the initcalls), `lockdown=confidentiality` (tracefs is not set up:
/// minutes of emulated trace-event string rewriting skipped), `clocksource=tsc
/// tsc=reliable` and, from [`compat_cmdline_for_tsc`], `tsc_early_khz=` at
/// [`TSC_SLOWDOWN`] times the real TSC rate. (Not `noapic`: our FADT is
/// hardware-reduced, so Linux leaves the 8259 unprogrammed and IRQ 4 arrives as
/// vector 4, an "overflow" oops in `serial8250_init`.)
pub const COMPAT_CMDLINE: &str = "noxsave clearcpuid=137,308,151 cryptomgr.notests nokaslr \
                                  pci=off nowatchdog mitigations=off lockdown=confidentiality \
                                  clocksource=tsc tsc=reliable";

/// How much slower than real time the guest's clock runs in compatibility mode: the
/// guest is told its TSC runs this many times faster than it does, so its timer tick
/// (HZ=250, each tick thousands of emulated instructions) comes this many times less
/// often. Measured: without it the tick took about 60% of the emulated CPU during boot.
pub const TSC_SLOWDOWN: u64 = 4;

/// [`compat_cmdline`] plus `tsc_early_khz=` for a host TSC of `tsc_khz` (none when 0).
pub fn compat_cmdline_for_tsc(base: &str, tsc_khz: u64) -> String {
    let mut c = compat_cmdline(base);
    if tsc_khz != 0
        && !c
            .split_whitespace()
            .any(|a| a.starts_with("tsc_early_khz="))
    {
        c.push_str(&format!(" tsc_early_khz={}", tsc_khz * TSC_SLOWDOWN));
    }
    c
}

/// The host TSC rate KVM gives a vCPU (`KVM_GET_TSC_KHZ` on a scratch VM); 0 when
/// it cannot be read.
pub fn host_tsc_khz() -> u64 {
    let Ok(kvm) = crate::vm::open_kvm() else {
        return 0;
    };
    let Ok(vm) = kvm.create_vm() else { return 0 };
    vm.create_vcpu(0)
        .ok()
        .and_then(|v| v.get_tsc_khz().ok())
        .map_or(0, u64::from)
}

/// `base` with the compat-mode arguments appended (those already there are kept once)
/// and `quiet` removed: the #PF hook is armed by the kernel's `Run /init` line, which
/// `quiet` would hide.
pub fn compat_cmdline(base: &str) -> String {
    let mut out = base
        .split_whitespace()
        .filter(|a| *a != "quiet")
        .collect::<Vec<_>>()
        .join(" ");
    for arg in COMPAT_CMDLINE.split_whitespace() {
        let key = arg.split('=').next().unwrap_or(arg);
        let present = out
            .split_whitespace()
            .any(|a| a.split('=').next() == Some(key));
        if !present {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(arg);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_appends_once() {
        let c = compat_cmdline("console=ttyS0 nokaslr");
        assert!(c.starts_with("console=ttyS0 nokaslr noxsave clearcpuid=137,308,151"));
        assert_eq!(c.matches("nokaslr").count(), 1);
        assert!(c.ends_with("tsc=reliable"));
        assert!(!compat_cmdline("quiet console=ttyS0").contains("quiet"));
        let t = compat_cmdline_for_tsc("console=ttyS0", 2_445_406);
        assert!(t.ends_with(" tsc_early_khz=9781624"), "{t}");
        assert_eq!(
            compat_cmdline_for_tsc("tsc_early_khz=1", 5)
                .matches("tsc_early")
                .count(),
            1
        );
        assert_eq!(
            compat_cmdline(""),
            COMPAT_CMDLINE
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
}
