//! ornament-introspect: understands a Linux guest from outside.
//!
//! ```text
//! [2] ProbeHit (ornament-engine)
//!      |
//!      v
//! symbols + profile  --> kaslr (slides) --> kernel (current task of a vCPU)
//!        |                                     |
//!        v            paging -> vmem ------> task (TaskReader, task list)
//! [3] probes (ProbeSet: what to arm)           |
//!        |                                     v
//!        +-------------------------> [3..6] monitor (hit -> event -> action)
//!                                        |            |
//!                                  [5] event    [6] ornament (Registry, Follow,
//!                                  (JSON/text)       EventWriter, DenySyscalls, ...)
//!                                                     |
//!                                              [7] Action back to the engine
//! ```
//!
//! Everything here reads guest memory only through [`ornament_engine::PhysMemory`], so it is
//! tested against synthetic guests ([`testing::SynthGuest`]) with no VM at all.
//!
//! The calls, in the order a monitor makes them:
//!
//! 1. [`profile::generate`]`(system_map, vmlinux_or_btf)`, or
//!    [`profile::generate_from_kernel`]`(bzimage)` from the kernel file alone
//!    ([`bzimage`] unpacks it, [`kallsyms`] reads its symbols), once per kernel build,
//!    then [`profile::Profile::save`]; at run time [`profile::Profile::load`].
//! 2. [`kaslr::detect_from_regs`] (MSR_LSTAR, a stop at a known symbol, or a scan for
//!    `linux_banner` through CR3) gives a [`kaslr::KernelLayout`];
//!    [`identity::verify_banner`] checks the guest runs the profile's kernel.
//! 3. [`kernel::Kernel::new`], then per hit [`kernel::Kernel::current_task`] and
//!    [`kernel::Kernel::kernel_vm`].
//! 4. [`task::TaskReader::new`], then [`task::TaskReader::read`] (a [`task::TaskInfo`]),
//!    [`task::TaskReader::user_regs`], [`task::TaskReader::processes`].
//! 5. [`probes::ProbeSet::new`]`(profile, layout, &WatchConfig)`: arm each
//!    [`probes::ArmSpec`] on the engine; then [`monitor::Monitor::new`], attach ornaments
//!    through [`monitor::Monitor::registry_mut`], and per hit
//!    [`monitor::Monitor::on_hit`] gives the events (stamped by [`lineage::Lineage`]:
//!    wall-clock time, `exec_id`s) and the [`ornament_engine::Action`] to answer with.
//!    Event schema: [`event::SCHEMA_DOC`] (`introspect/EVENTS.md`, JSON Schema
//!    [`event::JSON_SCHEMA`]); ECS documents: [`ornament::ecs`].
//!
//! ```
//! use ornament_introspect::{kaslr, kernel::Kernel, profile::Profile, task::TaskReader};
//! use ornament_introspect::testing::{SynthConfig, SynthGuest, TaskSpec};
//! use std::path::Path;
//!
//! let profile = Profile::load(Path::new("../profiles/6.1.0-50-cloud-amd64.json")).unwrap();
//! let mut guest = SynthGuest::new(profile, SynthConfig::default()).unwrap();
//! let task = guest.add_task(&TaskSpec::user(7, "sh", "/bin/sh", &["sh", "-i"])).unwrap();
//! guest.set_current(0, task).unwrap();
//!
//! let regs = guest.regs_user(0); // a vCPU stopped in user mode, no LSTAR at hand
//! let layout = kaslr::detect_from_regs(&guest.phys.mem, &guest.profile, &regs, None, None).unwrap();
//! ornament_introspect::identity::verify_banner(&guest.phys.mem, &layout, &guest.profile).unwrap();
//! let kernel = Kernel::new(&guest.phys.mem, &guest.profile, layout);
//! let current = kernel.current_task(&regs).unwrap();
//! let reader = TaskReader::new(&kernel).unwrap();
//! let info = reader.read(&kernel.kernel_vm(&regs), current);
//! assert_eq!(info.pid, Ok(7));
//! assert_eq!(info.exe_path, Ok(Some("/bin/sh".to_string())));
//! ```
#![forbid(unsafe_code)]

pub mod btf;
pub mod bytes;
pub mod bzimage;
pub mod command;
pub mod elf;
pub mod event;
pub mod fake_engine;
pub mod guest_text;
pub mod identity;
pub mod kallsyms;
pub mod kaslr;
pub mod kernel;
pub mod lineage;
pub mod monitor;
pub mod ornament;
pub mod paging;
pub mod probes;
pub mod profile;
pub mod session;
pub mod symbols;
pub mod task;
pub mod testing;
pub mod vmem;
