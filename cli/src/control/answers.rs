//! What the control socket answers from guest memory: `info` and `ps` ([`process_list`]),
//! read while the guest runs, every value bounded.

use super::{PROTOCOL_VERSION, PS_LIMITS, PS_SHORT_LIMITS, PS_TASK_BUDGET, PS_TOTAL_STRING_BYTES};
use crate::guest::GuestView;
use anyhow::Context;
use ornament_engine::Gva;
use ornament_introspect::kernel::Kernel;
use ornament_introspect::paging::{PageRoot, PagingMode};
use ornament_introspect::task::{TaskReader, WalkEnd, PF_KTHREAD};
use ornament_introspect::vmem::VirtMem;
use serde::{Deserialize, Serialize};

/// The `info` response body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// Kernel release of the profile (`uname -r`).
    pub release: String,
    /// The profile's `linux_banner`, checked against guest memory.
    pub banner: Option<String>,
    /// KASLR slides.
    pub layout: Layout,
    /// Number of vCPUs.
    pub vcpus: u32,
}

/// KASLR slides, as hex strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Runtime minus link-time virtual address of the kernel image.
    pub virt_slide: String,
    /// Runtime minus link-time physical address (`phys_base`), modulo 2^64.
    pub phys_slide: String,
}

/// The `info` answer for `view`.
pub fn info(view: &GuestView) -> Info {
    Info {
        protocol: PROTOCOL_VERSION,
        release: view.profile.kernel.release.clone(),
        banner: view.profile.kernel.banner.clone(),
        layout: Layout {
            virt_slide: format!("{:#x}", view.layout.virt_slide),
            phys_slide: format!("{:#x}", view.layout.phys_slide),
        },
        vcpus: view.vcpus,
    }
}

/// One process of a `ps` response; `None` (null) where the guest field was unreadable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    /// `task->pid`.
    pub pid: Option<i32>,
    /// `task->tgid`.
    pub tgid: Option<i32>,
    /// `task->real_parent->tgid`.
    pub ppid: Option<i32>,
    /// Real user id.
    pub uid: Option<u32>,
    /// Real group id.
    pub gid: Option<u32>,
    /// Effective user id.
    pub euid: Option<u32>,
    /// Effective group id.
    pub egid: Option<u32>,
    /// `task->comm`.
    pub comm: Option<String>,
    /// Command line (`[]` without an mm).
    pub args: Option<Vec<String>>,
    /// The command line was longer than the cap, or its tail unreadable.
    pub args_truncated: bool,
    /// Executable path.
    pub exe: Option<String>,
    /// Working directory (null for a task without an `fs_struct`, or unreadable).
    pub cwd: Option<String>,
    /// `PF_KTHREAD`.
    pub kernel_thread: Option<bool>,
    /// Address of the `task_struct` (hex).
    pub task: String,
}

/// The `ps` response body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessList {
    /// How the task-list walk ended: `complete`, `budget_exhausted`, `cycle`, `unreadable`.
    pub walk: String,
    /// Where a `cycle` or `unreadable` walk stopped (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub walk_at: Option<String>,
    /// The processes, in task-list order.
    pub processes: Vec<Process>,
}

/// The kernel's own page tables: `init_top_pgt` (swapper_pg_dir), which lives as long
/// as the kernel; else the CR3 taken when the kernel was identified (which may belong
/// to a process that has since exited, or to the early boot tables).
fn kernel_vm<'k>(kernel: &'k Kernel<'k>, view: &GuestView) -> VirtMem<'k> {
    let from_regs = kernel.kernel_vm(&view.regs);
    let Ok(pgt) = view.profile.symbol("init_top_pgt") else {
        return from_regs;
    };
    let swapper = VirtMem::new(
        kernel.mem(),
        PageRoot {
            table: view.layout.phys(pgt),
            mode: PagingMode::from_cr4(view.regs.cr4),
        },
    )
    .with_cache(kernel.cache());
    // Usable when it maps init_task (it is all zeroes until the kernel fills it).
    let probe = |vm: &VirtMem<'_>| {
        kernel
            .symbol("init_task")
            .is_ok_and(|t| vm.read_u64(t).is_ok())
    };
    if probe(&swapper) {
        swapper
    } else {
        from_regs
    }
}

/// The guest's process list, read from guest memory now.
pub fn process_list(view: &GuestView) -> anyhow::Result<ProcessList> {
    process_list_bounded(view, PS_TASK_BUDGET, PS_TOTAL_STRING_BYTES)
}

/// [`process_list`] with other budgets.
pub(super) fn process_list_bounded(
    view: &GuestView,
    task_budget: usize,
    total_string_bytes: u64,
) -> anyhow::Result<ProcessList> {
    let kernel = Kernel::new(&*view.ram, &view.profile, view.layout);
    let vm = kernel_vm(&kernel, view);
    let reader = TaskReader::new(&kernel).context("cannot read tasks with this profile")?;
    let flags_off = reader.offsets().flags;
    let full = reader.with_limits(PS_LIMITS);
    let short = TaskReader::new(&kernel)?.with_limits(PS_SHORT_LIMITS);
    let walk = full
        .processes(&vm, task_budget)
        .context("cannot walk the task list")?;
    let mut string_bytes = 0u64;
    let mut processes = Vec::with_capacity(walk.tasks.len());
    for &task in &walk.tasks {
        let r = if string_bytes < total_string_bytes {
            &full
        } else {
            &short
        };
        let info = r.read(&vm, task);
        let kthread = vm
            .read_u32(task.wrapping_add(flags_off))
            .ok()
            .map(|f| f & PF_KTHREAD != 0)
            .or(info.is_kernel_thread.ok());
        let (args, args_truncated) = match info.argv {
            Ok(Some(a)) => (Some(a.args), a.truncated),
            Ok(None) => (Some(Vec::new()), false),
            Err(_) => (None, false),
        };
        let exe = info.exe_path.ok().flatten();
        let cwd = info.cwd.ok().flatten();
        string_bytes += args
            .iter()
            .flatten()
            .chain(&exe)
            .chain(&cwd)
            .map(|a| a.len() as u64 + 1)
            .sum::<u64>();
        processes.push(Process {
            pid: info.pid.ok(),
            tgid: info.tgid.ok(),
            ppid: info.ppid.ok(),
            uid: info.uid.ok(),
            gid: info.gid.ok(),
            euid: info.euid.ok(),
            egid: info.egid.ok(),
            comm: info.comm.ok(),
            args,
            args_truncated,
            exe,
            cwd,
            kernel_thread: kthread,
            task: hex(task),
        });
    }
    let (walk_name, walk_at) = match walk.end {
        WalkEnd::Complete => ("complete", None),
        WalkEnd::BudgetExhausted => ("budget_exhausted", None),
        WalkEnd::Cycle { at } => ("cycle", Some(hex(at))),
        WalkEnd::Unreadable { at } => ("unreadable", Some(hex(at))),
    };
    Ok(ProcessList {
        walk: walk_name.into(),
        walk_at,
        processes,
    })
}

pub(super) fn hex(a: Gva) -> String {
    format!("{:#x}", a.raw())
}
