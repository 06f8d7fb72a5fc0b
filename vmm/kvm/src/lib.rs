//! ornament-kvm: our own KVM VMM, the engine for hosts where KVM runs the guest.
//!
//! Where it sits in ornament's data flow:
//!
//! ```text
//! guest vCPU --exit--> vcpu::KvmVcpu::run --> vcpu::exit::handle_exit        [1]
//!                         |  port I/O -> devices::PioBus (COM1, i8042)
//!                         |  probe port / KVM_EXIT_DEBUG -> trap::TrapBackend::recognise
//!                         v
//!                      TrapHit + registers (SYNC_REGS)
//!                         v
//!                      engine::KvmEngine -> ProbeHit over the Engine seam       [2]
//!                         ^ Action (answer), arm/disarm, pause               [7]
//! ```
//!
//! For the CLI:
//! - `ornament doctor`: [`support::host_support`] returns a serde-serializable
//!   [`support::HostSupport`] (access to `/dev/kvm`, PVM or hardware, API version,
//!   missing capabilities, max vCPUs, each trap backend's self-test, exit cost).
//! - `ornament run --engine kvm`: [`builder::build`] a [`builder::MachineConfig`]
//!   (returns a paused [`machine::Machine`]), then [`engine::KvmEngine::start`] it with a
//!   trap backend ([`trap::patch::PatchedSites`] once the kernel has finished patching
//!   its own text, or [`trap::debugreg::DebugRegs`]); arm probes, `set_paused(false)`,
//!   and loop on `next_event`.
//!
//! Modules:
//! - [`arm_point`]: where a Linux run arms its probes (a one-shot breakpoint, not the console);
//! - [`layout`]: every guest-physical address and port;
//! - [`memory`], [`vm`], [`vcpu`], [`machine`]: RAM, the VM fd, vCPUs, their threads;
//! - [`boot`]: GDT, identity page tables, long mode, zero page, e820, CPUID, ACPI (pure);
//! - [`builder`]: the Linux boot recipe;
//! - [`devices`]: the port-I/O bus, COM1, COM2 and the i8042;
//! - [`pvm`]: PVM compatibility (unmodified kernels on PVM hosts: syscall entry);
//! - [`trap`]: hardware debug registers and patched fentry sites;
//! - [`engine`]: `impl Engine for KvmEngine`;
//! - [`support`]: `host_support()` with the trap self-test and measurements;
//! - [`testing`]: hand-written guests and their harness (and `kvm_usable`, the probe tests gate on).

pub mod arm_point;
pub mod boot;
pub mod builder;
pub mod devices;
pub mod engine;
pub mod layout;
pub mod linux;
pub mod linux_engine;
pub mod machine;
pub mod memory;
pub mod pvm;
pub mod support;
pub mod testing;
pub mod trap;
pub mod vcpu;
pub mod vm;
