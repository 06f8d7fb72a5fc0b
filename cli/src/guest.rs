//! What the CLI knows about a running guest once its kernel is identified:
//! guest RAM, the kernel's profile and its KASLR layout. Shared (read-only) by
//! the control socket; pause and resume go to the watch session's [`Control`].

use ornament_engine::{PhysMemory, Regs};
use ornament_introspect::kaslr::KernelLayout;
use ornament_introspect::profile::Profile;
use ornament_introspect::session::Control;
use std::sync::Arc;

/// A running guest, seen from outside.
#[derive(Clone)]
pub struct GuestView {
    /// Guest-physical memory (readable while the guest runs).
    pub ram: Arc<dyn PhysMemory>,
    /// The kernel's profile (symbols and struct offsets).
    pub profile: Arc<Profile>,
    /// Where KASLR put the kernel.
    pub layout: KernelLayout,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Pause and resume requests (shared with the watch session).
    pub control: Arc<Control>,
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
