//! What the CLI knows about a running guest once its kernel is identified:
//! guest RAM, the kernel's profile and its KASLR layout. Shared (read-only) by
//! the event monitor and the control socket.

use ornament_engine::{PhysMemory, Regs};
use ornament_introspect::kaslr::KernelLayout;
use ornament_introspect::profile::Profile;
use std::sync::Arc;

/// Requests between the control socket and the run loop.
#[derive(Debug, Default)]
pub struct RunControl {
    /// The guest is stopped by an ornament's (or the socket's) pause.
    pub paused: std::sync::atomic::AtomicBool,
    /// Someone asked to pause the guest (control socket `pause`).
    pub pause_requested: std::sync::atomic::AtomicBool,
    /// Someone asked to resume a paused guest (control socket `resume`).
    pub resume_requested: std::sync::atomic::AtomicBool,
}

/// A running guest, seen from outside.
#[derive(Clone)]
pub struct GuestView {
    /// Guest-physical memory (readable while the guest runs).
    pub ram: Arc<dyn PhysMemory>,
    /// The same memory with the atomic updates the plugin link's syscall deny uses
    /// (`None` for memory that cannot do them, e.g. in tests).
    pub ram_for_writes: Option<Arc<dyn ornament_qemu::plugin_link::GuestRam>>,
    /// The kernel's profile (symbols and struct offsets).
    pub profile: Arc<Profile>,
    /// Where KASLR put the kernel.
    pub layout: KernelLayout,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Pause and resume requests (shared with the control socket).
    pub control: Arc<RunControl>,
    /// Registers of vCPU 0 taken when the kernel was identified (kernel mode);
    /// their `cr3`/`cr4` give the kernel's page tables.
    pub regs: Regs,
}

impl std::fmt::Debug for GuestView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestView")
            .field("release", &self.profile.kernel.release)
            .field("layout", &self.layout)
            .field("vcpus", &self.vcpus)
            .finish()
    }
}
