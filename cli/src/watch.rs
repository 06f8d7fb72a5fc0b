//! `ornament run --watch/--deny-syscall/--tree`: choose a trap backend, arm the
//! probes of the event set once the kernel is identified, and carry every hit
//! through the monitor to the ornaments and back as an action.
//!
//! ```text
//! plugin hit ─► Monitor::on_hit (task read, events) ─► ornaments ─► Action ─► plugin answer
//! ```

use crate::guest::GuestView;
use anyhow::{bail, Context, Result};
use ornament_engine::wire::{ProbeSpec, Reg, RegMask};
use ornament_images::overlay::COMMAND_ARGV;
use ornament_introspect::command::{CommandMatch, CommandTracker, CommandView, InCommand};
use ornament_introspect::event::{Event, EventMask};
use ornament_introspect::monitor::Monitor;
use ornament_introspect::ornament::{
    self, Decision, DenySyscalls, EventWriter, Follow, Ornament, OutputHealth, ProcessTree,
    RunSummary, SummaryCounts, TreeView,
};
use ornament_introspect::probes::{
    captured_at_hit, deny_rules, hit_bytes, hit_reads, parse_deny, syscall_numbers, ProbeKind,
    ProbeSet, SyscallHook, SyscallWatch, WatchConfig,
};
use ornament_introspect::profile::Profile;
use ornament_qemu::gdb::{GdbError, StopReply};
use ornament_qemu::machine::MachineError;
use ornament_qemu::plugin_link::{DenyConfig, PluginLink, PluginLinkError};
use ornament_qemu::{QemuInfo, QemuMachine};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Output format of events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One line of text per event.
    Text,
    /// One JSON object per line (schema: introspect/EVENTS.md).
    Json,
}

/// How probes trap under QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrapChoice {
    /// The TCG plugin where QEMU has plugin API v4 or later, else the gdbstub.
    Auto,
    /// ornament's TCG plugin (QEMU >= 10.0): the guest never stops for a hit.
    Plugin,
    /// QEMU's gdbstub breakpoints (every hit stops the guest: milliseconds each).
    Gdbstub,
}

/// Event options of `ornament run`.
#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// Report these events: fork, exec, exit, setid, syscall (every syscall) or
    /// syscall=NAME,NAME... (only those; other syscalls cost nothing), comma-separated.
    #[arg(long, value_name = "EVENTS")]
    watch: Option<String>,
    /// Event output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Write events to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Make syscall NAME fail with ERRNO (a name like EPERM or a number; default EPERM)
    /// without running it. Repeatable.
    #[arg(long = "deny-syscall", value_name = "NAME[:ERRNO]")]
    deny: Vec<String>,
    /// Only report events of this guest pid (and, with --follow, its descendants).
    #[arg(long, value_name = "PID")]
    pid: Option<i32>,
    /// With --pid: also every descendant of PID, as they are forked.
    #[arg(long, requires = "pid")]
    follow: bool,
    /// Report every task of the guest (boot-time kernel threads and ornament's /init
    /// too), and apply --deny-syscall to all of them. By default events and denials
    /// cover only COMMAND and its descendants.
    #[arg(long, conflicts_with = "pid")]
    all: bool,
    /// Print the process tree (forks, execs, exit codes) when the guest ends.
    #[arg(long)]
    tree: bool,
    /// Trap backend for probes under QEMU.
    #[arg(long, value_enum, default_value_t = TrapChoice::Auto)]
    trap: TrapChoice,
    /// Stop the whole guest when a process execs PATH (until `ornament resume
    /// --control SOCKET`; needs --control).
    #[arg(long, value_name = "PATH", requires = "control")]
    pause_on_exec: Option<String>,
}

/// Whose events are reported and whose syscalls are denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The command's process and its descendants (the default).
    Command,
    /// Every task of the guest (`--all`).
    All,
    /// One pid (`--pid`), and with `true` its descendants (`--follow`).
    Pid(i32, bool),
}

/// The parsed event options.
#[derive(Debug, Clone)]
pub struct WatchPlan {
    /// Whose events count.
    pub scope: Scope,
    /// What to trap (events, syscalls, deny rules), as introspect reads it.
    pub cfg: WatchConfig,
    /// Output format.
    pub format: Format,
    /// Output file.
    pub output: Option<PathBuf>,
    /// Print a tree at the end.
    pub tree: bool,
    /// Trap backend asked for.
    pub trap: TrapChoice,
    /// The events the user asked to see (the tree and --follow may trap more).
    pub shown: EventMask,
    /// Pause the guest when a process execs this path.
    pub pause_on_exec: Option<String>,
}

impl WatchArgs {
    /// Did the user ask for any event option (beyond what every run observes)?
    pub fn asked(&self) -> bool {
        self.watch.is_some()
            || !self.deny.is_empty()
            || self.tree
            || self.pause_on_exec.is_some()
            || self.pid.is_some()
            || self.all
    }

    /// `--output FILE`, if given.
    pub fn output_path(&self) -> Option<&std::path::Path> {
        self.output.as_deref()
    }

    /// The plan. Fork, exec and exit are always trapped, whatever was asked: they tell
    /// which process is the command, which descend from it, and the command's exit
    /// status, all from what the hypervisor sees.
    pub fn plan(&self) -> Result<WatchPlan> {
        let mut cfg = WatchConfig::default();
        if let Some(w) = &self.watch {
            if w.split(',').all(|name| name.trim().is_empty()) {
                bail!(
                    "--watch {w:?} names no event: give fork, exec, exit, setid, syscall or syscall=NAME,... (comma-separated)"
                );
            }
            cfg.add_watch_list(w)
                .with_context(|| format!("--watch {w}"))?;
        }
        let mut shown = EventMask::NONE;
        for (on, m) in [
            (cfg.fork, EventMask::FORK),
            (cfg.exec, EventMask::EXEC),
            (cfg.exit, EventMask::EXIT),
            (cfg.setid, EventMask::SETID),
            (cfg.syscalls != SyscallWatch::None, EventMask::SYSCALL),
        ] {
            if on {
                shown = shown | m;
            }
        }
        // The command tracker, the tree and the follow filter are built from
        // lifecycle events.
        cfg.fork = true;
        cfg.exec = true;
        cfg.exit = true;
        for d in &self.deny {
            cfg.deny
                .push(parse_deny(d).with_context(|| format!("--deny-syscall {d}"))?);
        }
        let scope = match (self.pid, self.all) {
            (Some(p), _) => Scope::Pid(p, self.follow),
            (None, true) => Scope::All,
            (None, false) => Scope::Command,
        };
        Ok(WatchPlan {
            scope,
            cfg,
            format: self.format,
            output: self.output.clone(),
            tree: self.tree,
            trap: self.trap,
            shown,
            pause_on_exec: self.pause_on_exec.clone(),
        })
    }
}

/// Where the TCG plugin library is: `$ORNAMENT_TCG_PLUGIN`, else beside the
/// `ornament` executable (cargo's target dir), else `../lib/ornament/`.
pub fn find_plugin() -> Option<PathBuf> {
    const NAME: &str = "libornament_tcg_plugin.so";
    if let Some(p) = std::env::var_os("ORNAMENT_TCG_PLUGIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join(NAME), dir.join("../lib/ornament").join(NAME)]
        .into_iter()
        .find(|p| p.is_file())
}

/// A prepared tracing session: trap backend chosen (and, for the plugin, its
/// socket listening).
pub struct Tracer {
    plan: WatchPlan,
    backend: Backend,
}

/// How hits reach us.
enum Backend {
    /// ornament's TCG plugin over its socket.
    Plugin {
        so: PathBuf,
        link: Box<PluginLink>,
        _dir: tempfile::TempDir,
    },
    /// QEMU's gdbstub breakpoints, resumed past the 5-byte fentry NOP.
    Gdbstub,
}

/// The fentry NOP every traceable kernel function starts with once the kernel
/// has patched its `call __fentry__` sites.
const FENTRY_NOP: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer").field("plan", &self.plan).finish()
    }
}

impl Tracer {
    /// Choose the trap backend (and say which), check names against the profile,
    /// and open the plugin's socket.
    pub fn prepare(plan: &WatchPlan, profile: &Profile, qemu: &QemuInfo) -> Result<Self> {
        // Unknown syscall names and errnos are refused before the guest starts.
        deny_rules(profile, &plan.cfg.deny)
            .with_context(|| format!("kernel {}", profile.kernel.release))?;
        if let SyscallWatch::Named(names) = &plan.cfg.syscalls {
            syscall_numbers(profile, names)
                .with_context(|| format!("--watch: kernel {}", profile.kernel.release))?;
        }
        let api = qemu.plugin_api.unwrap_or(0);
        if let Some(p) = std::env::var_os("ORNAMENT_TCG_PLUGIN") {
            if !std::path::Path::new(&p).is_file() {
                bail!(
                    "ORNAMENT_TCG_PLUGIN={}: no such file",
                    PathBuf::from(p).display()
                );
            }
        }
        let so = find_plugin().filter(|p| p.is_file());
        let backend = match (plan.trap, api >= 4, so) {
            (TrapChoice::Gdbstub, _, _) => {
                eprintln!("ornament: trap gdbstub (forced): every hit stops the guest and flushes QEMU's translation cache (milliseconds each)");
                Backend::Gdbstub
            }
            (TrapChoice::Plugin, false, _) => bail!(
                "--trap plugin: {} has TCG plugin API v{api}; ornament's plugin needs v4 (QEMU >= 10.0; on Debian 12: apt-get install -t bookworm-backports qemu-system-x86)",
                qemu.binary.display()
            ),
            (TrapChoice::Plugin, true, None) => bail!(
                "--trap plugin: ornament's TCG plugin (libornament_tcg_plugin.so) was not found beside the ornament binary; build it with `cargo build -p ornament-tcg-plugin` or set ORNAMENT_TCG_PLUGIN"
            ),
            (TrapChoice::Auto, false, _) => {
                eprintln!("ornament: trap gdbstub: QEMU's plugin API is v{api} (the plugin needs v4, QEMU >= 10.0); every hit stops the guest (milliseconds each)");
                Backend::Gdbstub
            }
            (TrapChoice::Auto, true, None) => {
                eprintln!("ornament: trap gdbstub: libornament_tcg_plugin.so not found (cargo build -p ornament-tcg-plugin); every hit stops the guest (milliseconds each)");
                Backend::Gdbstub
            }
            (_, true, Some(so)) => {
                eprintln!(
                    "ornament: trap plugin ({}): QEMU {} offers plugin API v{api}; hits never stop the guest",
                    so.display(),
                    qemu.version_line
                );
                let dir = crate::cmd::run::private_dir()?;
                let link = PluginLink::listen(&dir.path().join("plugin.sock"))?;
                Backend::Plugin {
                    so,
                    link: Box::new(link),
                    _dir: dir,
                }
            }
        };
        if matches!(backend, Backend::Gdbstub) && !plan.cfg.deny.is_empty() {
            bail!("--deny-syscall needs the plugin trap backend (QEMU >= 10.0); the gdbstub backend cannot skip a syscall");
        }
        Ok(Self {
            plan: plan.clone(),
            backend,
        })
    }

    /// The plugin to load into QEMU.
    pub fn plugin_so(&self) -> Option<(PathBuf, Vec<String>)> {
        match &self.backend {
            Backend::Plugin { so, .. } => Some((so.clone(), Vec::new())),
            Backend::Gdbstub => None,
        }
    }

    /// The link QEMU's plugin connects to.
    pub fn link_mut(&mut self) -> Option<&mut PluginLink> {
        match &mut self.backend {
            Backend::Plugin { link, .. } => Some(link),
            Backend::Gdbstub => None,
        }
    }

    /// Arm the probes (the guest is stopped after identification), run the guest,
    /// and deliver every hit until the guest ends.
    ///
    /// The outer error: the session could not start. Otherwise what the session recorded
    /// (kept even when the run failed) and how the run ended.
    pub fn run(
        &mut self,
        machine: &mut QemuMachine,
        view: &Arc<GuestView>,
        stop: &Arc<AtomicBool>,
        timeout: Option<Duration>,
    ) -> Result<(Record, Result<()>)> {
        let mut session = Session::new(&self.plan, view, stop)?;
        let ran = match &mut self.backend {
            Backend::Plugin { link, .. } => run_plugin(
                link,
                &mut session,
                machine,
                view,
                stop,
                timeout,
                self.plan.pause_on_exec.is_some(),
            ),
            Backend::Gdbstub => run_gdbstub(&mut session, machine, view, stop, timeout),
        };
        Ok((session.finish(), ran))
    }
}

/// The plugin backend: arm, run, deliver every hit (answering held ones) until the
/// guest ends.
fn run_plugin(
    link: &mut PluginLink,
    session: &mut Session,
    machine: &mut QemuMachine,
    view: &Arc<GuestView>,
    stop: &AtomicBool,
    timeout: Option<Duration>,
    exec_acts: bool,
) -> Result<()> {
    {
        arm_plugin(link, session, view, exec_acts)?;
        machine.resume()?;
        let begin = Instant::now();
        let result = loop {
            if stop.load(Ordering::Relaxed) {
                machine.kill();
                break Err(MachineError::Interrupted);
            }
            if let Some(t) = timeout {
                if begin.elapsed() > t {
                    machine.kill();
                    break Err(MachineError::Timeout(t));
                }
            }
            let control = &view.control;
            if control.pause_requested.swap(false, Ordering::SeqCst) {
                pause_guest(machine, link, session, control, stop)?;
            }
            match link.next_hit(Duration::from_millis(20)) {
                Ok(Some(hit)) => {
                    let (action, pause) = session.deliver_full(&hit.hit);
                    if hit.hit.held {
                        if let Err(e) = link.answer(&hit, action) {
                            tracing::warn!(error = %e, "answering a held hit failed");
                        }
                    }
                    if pause {
                        eprintln!("ornament: an ornament paused the guest; resume it with `ornament resume --control SOCKET`");
                        pause_guest(machine, link, session, control, stop)?;
                    }
                    continue;
                }
                Ok(None) => {}
                Err(PluginLinkError::Closed) => {}
                Err(e) => tracing::warn!(error = %e, "plugin link"),
            }
            match machine.poll_exit(Duration::from_millis(1)) {
                Ok(true) => {
                    // Deliver what the plugin sent before QEMU went away.
                    while let Ok(Some(hit)) = link.next_hit(Duration::from_millis(50)) {
                        session.deliver(&hit.hit);
                    }
                    break Ok(());
                }
                Ok(false) => {}
                Err(e) => break Err(e),
            }
        };
        Ok(result?)
    }
}

/// Stop every vCPU until the control socket says resume (or the run is stopped).
/// Hits that arrive while QEMU stops the vCPUs are still delivered and answered:
/// a held vCPU must be answered before QEMU can stop it.
fn pause_guest(
    machine: &mut QemuMachine,
    link: &mut PluginLink,
    session: &mut Session,
    control: &crate::guest::RunControl,
    stop: &AtomicBool,
) -> Result<()> {
    machine.gdb().request_stop()?;
    loop {
        while let Ok(Some(hit)) = link.next_hit(Duration::from_millis(1)) {
            let (action, _) = session.deliver_full(&hit.hit);
            if hit.hit.held {
                let _ = link.answer(&hit, action);
            }
        }
        match machine.gdb().wait_stop(Duration::from_millis(20))? {
            Some(StopReply::Exited(_) | StopReply::Terminated(_)) => return Ok(()),
            Some(_) => break,
            None => {}
        }
    }
    control.paused.store(true, Ordering::SeqCst);
    tracing::info!("guest paused");
    while !control.resume_requested.swap(false, Ordering::SeqCst) {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    control.paused.store(false, Ordering::SeqCst);
    tracing::info!("guest resumed");
    machine.resume()?;
    Ok(())
}

/// The gdbstub backend: a breakpoint per probe; each hit stops the guest, is
/// delivered, and the vCPU resumes past the site's 5-byte fentry NOP (measured
/// exact; a step-over re-inserting the breakpoint overcounts).
fn run_gdbstub(
    session: &mut Session,
    machine: &mut QemuMachine,
    view: &GuestView,
    stop: &AtomicBool,
    timeout: Option<Duration>,
) -> Result<()> {
    let mut by_addr = std::collections::HashMap::new();
    for spec in session.probes.specs() {
        let gpa = ornament_qemu::plugin_link::translate(
            view.ram.as_ref(),
            view.regs.cr3,
            view.regs.cr4 & (1 << 12) != 0,
            spec.at,
        )
        .with_context(|| format!("probe {} at {}: not mapped", spec.symbol, spec.at))?;
        let mut bytes = [0u8; 5];
        view.ram
            .read_phys(gpa, &mut bytes)
            .with_context(|| format!("probe {} at {}", spec.symbol, spec.at))?;
        // Before ftrace has run at boot the site still holds `call __fentry__`,
        // which is as safe to skip: __fentry__ only returns.
        let calls_fentry = bytes[0] == 0xe8
            && view.profile.symbol("__fentry__").ok().is_some_and(|f| {
                let rel = i32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
                let target = spec
                    .at
                    .raw()
                    .wrapping_add(5)
                    .wrapping_add_signed(i64::from(rel));
                target == view.layout.virt(f).raw()
            });
        if bytes != FENTRY_NOP && !calls_fentry {
            bail!(
                "probe {} at {}: the gdbstub backend resumes past a 5-byte fentry site (NOP or call __fentry__), but the site holds {:02x?} (every-syscall and deny probes need the plugin backend)",
                spec.symbol,
                spec.at,
                bytes
            );
        }
        machine.gdb().breakpoint(spec.at.raw(), true)?;
        by_addr.insert(spec.at.raw(), spec.id);
    }
    let begin = Instant::now();
    let mut seq = 0u64;
    let mut resume_at: Option<u64> = None;
    let result = loop {
        if stop.load(Ordering::Relaxed) {
            break Err(MachineError::Interrupted.into());
        }
        if let Some(t) = timeout {
            if begin.elapsed() > t {
                break Err(MachineError::Timeout(t).into());
            }
        }
        if !machine.gdb().is_running() {
            machine.gdb().cont(resume_at.take())?;
        }
        match machine.gdb().wait_stop(Duration::from_millis(100)) {
            Ok(None) => {}
            Ok(Some(StopReply::Exited(_) | StopReply::Terminated(_))) | Err(GdbError::Closed) => {
                break Ok(())
            }
            Ok(Some(StopReply::Signal { vcpu, .. })) => {
                let vcpu = vcpu.unwrap_or(0);
                let regs = machine.gdb().registers(vcpu)?;
                match by_addr.get(&regs.rip) {
                    Some(&probe) => {
                        seq += 1;
                        let hit = ornament_engine::ProbeHit {
                            probe,
                            vcpu,
                            seq,
                            time_ns: u64::try_from(machine.elapsed().as_nanos())
                                .unwrap_or(u64::MAX),
                            regs,
                            held: true,
                            mem: [None; ornament_engine::wire::MAX_MEM_READS],
                            bytes: None,
                        };
                        let action = session.deliver(&hit);
                        if action != ornament_engine::Action::Continue {
                            tracing::warn!(?action, "the gdbstub backend can only continue");
                        }
                        resume_at = Some(regs.rip + FENTRY_NOP.len() as u64);
                    }
                    None => tracing::debug!(rip = regs.rip, "stop outside a probe; resuming"),
                }
            }
            Err(e) => break Err(e.into()),
        }
    };
    result
}

/// Arm the probe set in the plugin. Each probe reads only the registers the monitor uses
/// for its kind (rdi, the hook's argument; gs_base, the per-CPU area; cr3 and cr4, the page
/// tables it reads the task through, which the plugin's own page walk needs too; rsi where
/// the hook has a second argument) and the memory reads of `hit_reads` (with exec's command
/// line, `hit_bytes`). Fork, exec and exit probes whose events are complete from those reads
/// (`captured_at_hit`) do not hold the vCPU, except exec when `exec_acts` (an ornament pauses
/// the guest at exec, before the new program runs); setid, `do_exit`, `begin_new_exec`,
/// exit/exit_group syscalls and deny probes still do.
fn arm_plugin(
    link: &mut PluginLink,
    session: &Session,
    view: &GuestView,
    exec_acts: bool,
) -> Result<()> {
    let p = &view.profile;
    let needed = RegMask::of(&[Reg::Rdi, Reg::GsBase, Reg::Cr3, Reg::Cr4]);
    let current_task_offset =
        p.percpu_current_task.symbol_offset + p.percpu_current_task.field_offset;
    let deny = if session.probes.deny_rules().is_empty() {
        None
    } else {
        let cfg = DenyConfig {
            syscall_exit: view.layout.virt(p.symbol("syscall_exit_to_user_mode")?),
            current_task_offset,
            syscall_work_offset: p.offset("task_struct", "thread_info.syscall_work")?,
            syscall_emu_bit: SYSCALL_WORK_BIT_SYSCALL_EMU,
            pt_regs_ax_offset: p.offset("pt_regs", "ax")?,
        };
        let ram = view
            .ram_for_writes
            .clone()
            .context("this guest memory cannot be written atomically; --deny-syscall needs it")?;
        link.enable_deny(cfg, ram)?;
        Some(cfg)
    };
    for spec in session.probes.specs() {
        let probe = match (&deny, spec.hold, &spec.syscall_filter) {
            // A held do_syscall_64 probe: the deny path needs its own spec (its registers
            // cover what the monitor reads; it reads the task from memory while held).
            (Some(cfg), true, filter) if spec.symbol == "do_syscall_64" => {
                let nrs: Vec<u64> = match filter {
                    Some(f) => f.iter().map(|&n| u64::from(n)).collect(),
                    None => (0..512).collect(),
                };
                cfg.entry_spec(&nrs, RegMask::NONE)
            }
            (_, hold, filter) => {
                // Hooks with a second argument: do_syscall_64(regs, nr), proc_id_connector(task,
                // which).
                let second = matches!(
                    spec.kind,
                    ProbeKind::Syscall(SyscallHook::DoSyscall64) | ProbeKind::Setid
                );
                let regs = if second {
                    RegMask(needed.0 | RegMask::of(&[Reg::Rsi]).0)
                } else {
                    needed
                };
                let mut ps = ProbeSpec::regs(regs);
                // Syscall arguments (pt_regs is overwritten at the task's next syscall), the
                // current task, and for fork, exec and exit everything the event reports.
                ps.mem = hit_reads(spec.kind, p)?;
                ps.bytes = hit_bytes(spec.kind);
                let acts = exec_acts && matches!(spec.kind, ProbeKind::Exec(_));
                let mut hold = hold && (acts || !captured_at_hit(spec.kind));
                if let ProbeKind::Syscall(SyscallHook::Function { nr }) = spec.kind {
                    // exit and exit_group end the task: hold so that it is read
                    // before it can be reaped.
                    hold |= ["exit", "exit_group"]
                        .iter()
                        .any(|n| p.syscall_nr(n) == Some(nr));
                }
                if let Some(f) = filter {
                    let nrs: Vec<u64> = f.iter().map(|&n| u64::from(n)).collect();
                    ps = ps.with_filter(Reg::Rsi, &nrs);
                }
                ps.hold = hold;
                ps
            }
        };
        link.arm(spec.id, spec.at, probe)?;
        tracing::debug!(probe = ?spec.id, symbol = %spec.symbol, at = %spec.at, hold = probe.hold, "armed");
    }
    Ok(())
}

/// `SYSCALL_WORK_BIT_SYSCALL_EMU` of `enum syscall_work_bit` (include/linux/thread_info.h,
/// unchanged since 5.11): setting it makes `syscall_trace_enter` skip the syscall.
pub const SYSCALL_WORK_BIT_SYSCALL_EMU: u32 = 3;

/// The monitor and its ornaments for one run.
pub(crate) struct Session {
    monitor: Monitor,
    probes: ProbeSet,
    tree: Option<TreeView>,
    tree_out: Option<PathBuf>,
    command: CommandView,
    output: Option<OutputHealth>,
    summary: Arc<std::sync::Mutex<SummaryCounts>>,
    began: Instant,
}

/// What a session recorded, for the end of the run.
#[derive(Debug, Clone)]
pub struct Record {
    /// The command's process and how it ended, as the hypervisor saw them.
    pub command: CommandView,
    /// The event output's health, when events were written.
    pub output: Option<OutputHealth>,
    /// What the watched processes did.
    pub summary: SummaryCounts,
    /// How long the session ran.
    pub elapsed: Duration,
}

/// Restrict `inner` to the events of `scope`.
fn scoped(scope: Scope, command: &CommandView, inner: Box<dyn Ornament>) -> Box<dyn Ornament> {
    match scope {
        Scope::Command => Box::new(InCommand::new(command.clone(), inner)),
        Scope::All => inner,
        Scope::Pid(root, true) => Box::new(Follow::new(root, inner)),
        Scope::Pid(pid, false) => Box::new(OnlyPid { pid, inner }),
    }
}

impl Session {
    pub(crate) fn new(plan: &WatchPlan, view: &GuestView, stop: &Arc<AtomicBool>) -> Result<Self> {
        let probes = ProbeSet::new(&view.profile, view.layout, &plan.cfg)?;
        Self::with_probes(plan, view, probes, stop)
    }

    /// A session over a probe set built earlier (the KVM engine resolves its probe sites
    /// before the guest boots, and the monitor must use the same ids). A failing event
    /// output sets `stop`.
    pub(crate) fn with_probes(
        plan: &WatchPlan,
        view: &GuestView,
        probes: ProbeSet,
        stop: &Arc<AtomicBool>,
    ) -> Result<Self> {
        for w in probes.warnings() {
            eprintln!("ornament: warning: {w}");
        }
        let mut monitor = Monitor::new(
            view.ram.clone(),
            view.profile.clone(),
            view.layout,
            probes.clone(),
        )?;
        let tracker = CommandTracker::new(CommandMatch {
            parent_tgid: 1,
            argv_prefix: COMMAND_ARGV.iter().map(|s| (*s).to_owned()).collect(),
        });
        let command = tracker.view();
        let scope = plan.scope;
        let reg = monitor.registry_mut();
        // Built-in ornaments, in delivery order, one line each: the tracker first (every
        // later one sees the command's tree as it is at the event), the writer last (it
        // reports what the others decided).
        reg.attach(Box::new(tracker));
        if !probes.deny_rules().is_empty() {
            let deny = Box::new(DenySyscalls::new(probes.deny_rules().clone()));
            reg.attach(scoped(scope, &command, deny));
        }
        if let Some(path) = &plan.pause_on_exec {
            reg.attach(Box::new(PauseOnExec { path: path.clone() }));
        }
        let tree = plan.tree.then(|| {
            let t = ProcessTree::new();
            let v = t.view();
            reg.attach(scoped(scope, &command, Box::new(t)));
            v
        });
        let output = if plan.shown == EventMask::NONE {
            None
        } else {
            let out: Box<dyn std::io::Write + Send> = match &plan.output {
                // Line-buffered: a file being followed (tail -f) sees each event as it comes.
                Some(path) => Box::new(std::io::LineWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("--output {}", path.display()))?,
                )),
                None => Box::new(std::io::LineWriter::new(std::io::stdout())),
            };
            let format = match plan.format {
                Format::Text => ornament::Format::Text,
                Format::Json => ornament::Format::Json,
            };
            let writer = EventWriter::new(out, format)
                .with_mask(plan.shown)
                .stop_on_error(stop.clone());
            let health = writer.health();
            reg.attach(scoped(scope, &command, Box::new(writer)));
            Some(health)
        };
        let summary = RunSummary::new();
        let counts = summary.counts();
        reg.attach(scoped(scope, &command, Box::new(summary)));
        Ok(Self {
            monitor,
            probes,
            tree,
            tree_out: plan.output.clone(),
            command,
            output,
            summary: counts,
            began: Instant::now(),
        })
    }

    /// The action and whether an ornament asked to pause the guest.
    pub(crate) fn deliver_full(
        &mut self,
        hit: &ornament_engine::ProbeHit,
    ) -> (ornament_engine::Action, bool) {
        let out = self.monitor.on_hit(hit);
        let pause = out.pause || out.action == ornament_engine::Action::PauseGuest;
        let action = match out.action {
            // The pause is applied to the whole guest below; this vCPU just goes on.
            ornament_engine::Action::PauseGuest => ornament_engine::Action::Continue,
            a => a,
        };
        (action, pause)
    }

    fn deliver(&mut self, hit: &ornament_engine::ProbeHit) -> ornament_engine::Action {
        self.deliver_full(hit).0
    }

    /// Flush the ornaments, print the tree; what the session recorded.
    pub(crate) fn finish(&mut self) -> Record {
        self.monitor.finish();
        if let Some(t) = &self.tree {
            let text = t.render();
            match &self.tree_out {
                Some(path) => {
                    use std::io::Write;
                    if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(path) {
                        let _ = f.write_all(text.as_bytes());
                    }
                }
                None => print!("{text}"),
            }
        }
        let s = self.monitor.stats();
        tracing::info!(?s, "monitor");
        Record {
            command: self.command.clone(),
            output: self.output.clone(),
            summary: self
                .summary
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            elapsed: self.began.elapsed(),
        }
    }
}

/// Asks to pause the guest when a process execs a given path (`--pause-on-exec`).
struct PauseOnExec {
    path: String,
}

impl Ornament for PauseOnExec {
    fn name(&self) -> &str {
        "pause-on-exec"
    }

    fn mask(&self) -> EventMask {
        EventMask::EXEC
    }

    fn on_event(&mut self, ev: &Event, d: &mut Decision) {
        if let Event::Exec(x) = ev {
            if x.filename.as_deref() == Some(self.path.as_str()) {
                d.pause();
            }
        }
    }
}

/// Passes on only the events of one pid (`--pid` without `--follow`).
struct OnlyPid {
    pid: i32,
    inner: Box<dyn Ornament>,
}

impl Ornament for OnlyPid {
    fn name(&self) -> &str {
        "only-pid"
    }

    fn mask(&self) -> EventMask {
        self.inner.mask()
    }

    fn on_event(&mut self, ev: &Event, d: &mut Decision) {
        if ev.task().pid == Some(self.pid) {
            self.inner.on_event(ev, d);
        }
    }
}
