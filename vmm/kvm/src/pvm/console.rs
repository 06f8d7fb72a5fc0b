//! When to arm the #PF hook: the console line that comes just before user space, watched on
//! the vCPU thread that writes the UART.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The console line after which the #PF breakpoint is armed: the kernel prints it
/// just before it starts user space.
pub const ARM_HOOK_AFTER: &str = "Run /init as init process";

/// Watches the console for [`ARM_HOOK_AFTER`] (a line may arrive in pieces).
#[derive(Debug, Default)]
pub struct LineWatch {
    tail: Vec<u8>,
}

impl LineWatch {
    /// Feed console bytes; true when `needle` has appeared (in this chunk or across
    /// the previous one).
    pub fn feed(&mut self, bytes: &[u8], needle: &[u8]) -> bool {
        self.tail.extend_from_slice(bytes);
        let found = self.tail.windows(needle.len()).any(|w| w == needle);
        let keep = needle.len().saturating_sub(1);
        if self.tail.len() > keep {
            self.tail.drain(..self.tail.len() - keep);
        }
        found
    }
}

/// PVM compatibility state shared by a machine's vCPUs.
#[derive(Debug, Default)]
pub struct PvmShared {
    hook_wanted: AtomicBool,
}

impl PvmShared {
    /// Ask every vCPU to arm the #PF handler breakpoint (at its next exit).
    pub fn want_hook(&self) {
        self.hook_wanted.store(true, Ordering::SeqCst);
    }

    /// True once the hook was asked for.
    pub fn hook_wanted(&self) -> bool {
        self.hook_wanted.load(Ordering::SeqCst)
    }
}

/// A console writer that asks for the #PF hook when [`ARM_HOOK_AFTER`] goes by. It
/// runs on the vCPU thread that writes the UART, so the flag is set before that vCPU
/// enters the guest again, long before init's first `syscall`.
pub struct HookArmingConsole {
    inner: Box<dyn Write + Send>,
    watch: LineWatch,
    shared: Arc<PvmShared>,
}

impl std::fmt::Debug for HookArmingConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookArmingConsole").finish_non_exhaustive()
    }
}

impl HookArmingConsole {
    /// Wrap `inner`.
    pub fn new(inner: Box<dyn Write + Send>, shared: Arc<PvmShared>) -> Self {
        Self {
            inner,
            watch: LineWatch::default(),
            shared,
        }
    }
}

impl Write for HookArmingConsole {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if !self.shared.hook_wanted() && self.watch.feed(b, ARM_HOOK_AFTER.as_bytes()) {
            tracing::info!("console shows {ARM_HOOK_AFTER:?}: arming the #PF hook");
            self.shared.want_hook();
        }
        self.inner.write_all(b)?;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_watch_sees_split_lines() {
        let mut w = LineWatch::default();
        let n = ARM_HOOK_AFTER.as_bytes();
        assert!(!w.feed(b"[ 1.0] Run /in", n));
        assert!(w.feed(b"it as init process\n", n));
        assert!(!w.feed(b"other\n", n));
    }
}
