//! `ornament run --watch/--deny-syscall/--tree/--timeline/--trace/--pause-on-exec`: the
//! options, and the ornaments they attach to introspect's watch session, which runs over
//! either engine.
//!
//! ```text
//! WatchArgs ─► WatchPlan ─► Session (probes for this engine) + ornaments ─► run ─► Record
//! ```

use crate::guest::GuestView;
use anyhow::{bail, Context, Result};
use ornament_engine::{Engine, GuestExit};
use ornament_images::overlay::COMMAND_ARGV;
use ornament_introspect::command::{CommandMatch, CommandTracker, CommandView};
use ornament_introspect::event::EventMask;
use ornament_introspect::kaslr::KernelLayout;
use ornament_introspect::ornament::{
    self, timeline, BlockRule, BlockSignals, Consumers, DenySyscalls, EventWriter, Ornament,
    OutputHealth, ProcessTree, RunSummary, StagedFile, SummaryCounts, Timeline, TimelineView,
    TreeView, CONSUMER_QUEUE,
};
use ornament_introspect::probes::{parse_deny, SyscallWatch, WatchConfig};
use ornament_introspect::profile::Profile;
use ornament_introspect::session::{scoped, Limits, Notice, PauseOnExec, Scope, Session};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Output format of events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One line of text per event.
    Text,
    /// One JSON object per line (schema: introspect/EVENTS.md).
    Json,
    /// One Elastic Common Schema document per line (ECS 9.4.0).
    Ecs,
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
    /// Report these events: fork, exec (and failed execs), exit, setid, signal (generated
    /// and delivered), syscall (every syscall) or syscall=NAME,NAME... (only those), each
    /// syscall with what it returned (QEMU engine), comma-separated. syscall=... goes last.
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
    /// Refuse signal SIG (TERM, SIGUSR1, 9, ...) sent by any guest task to a process whose
    /// comm is COMM (any process without :COMM): the sender's kill/tkill/tgkill/sigqueue
    /// fails with EPERM and the target never gets it. Signals the kernel makes itself
    /// (SIGSEGV, SIGPIPE, SIGCHLD) are not blocked. Repeatable; whole guest, whatever the
    /// scope.
    #[arg(long = "block-signal", value_name = "SIG[:COMM]")]
    block_signal: Vec<String>,
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
    /// Write a timeline of the run to FILE when the guest ends: one self-contained HTML
    /// page, each process a lane from fork to exit with its execs (argv), its exit code,
    /// its parent, and its syscalls as density (with --watch syscall...).
    #[arg(long, value_name = "FILE.html")]
    timeline: Option<PathBuf>,
    /// Write the run's processes to FILE when the guest ends, in the Chrome trace-event
    /// format (JSON) that Perfetto's UI and chrome://tracing open.
    #[arg(long, value_name = "FILE.json")]
    trace: Option<PathBuf>,
    /// Trap backend for probes under QEMU.
    #[arg(long, value_enum, default_value_t = TrapChoice::Auto)]
    trap: TrapChoice,
    /// Stop the whole guest when a process execs PATH (until `ornament resume
    /// --control SOCKET`; needs --control).
    #[arg(long, value_name = "PATH", requires = "control")]
    pause_on_exec: Option<String>,
    /// Also export the events (those of --watch; fork, exec and exit without it) as
    /// OpenTelemetry log records over OTLP/HTTP (protobuf) to URL, e.g.
    /// http://127.0.0.1:4318 (`/v1/logs` is added to a URL with no path). Attributes
    /// carry ECS names. The run fails if any event did not reach the collector.
    #[arg(long, value_name = "URL")]
    otlp: Option<String>,
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
    /// Write a timeline page here at the end.
    pub timeline: Option<PathBuf>,
    /// Write a Chrome trace here at the end.
    pub trace: Option<PathBuf>,
    /// Trap backend asked for.
    pub trap: TrapChoice,
    /// The events the user asked to see (the tree and --follow may trap more).
    pub shown: EventMask,
    /// Pause the guest when a process execs this path.
    pub pause_on_exec: Option<String>,
    /// `--block-signal` rules.
    pub block_signals: Vec<BlockRule>,
    /// Export events over OTLP, and which.
    pub otlp: Option<(ornament_otlp::OtlpConfig, EventMask)>,
}

impl WatchArgs {
    /// Did the user ask for any event option (beyond what every run observes)?
    pub fn asked(&self) -> bool {
        self.watch.is_some()
            || !self.deny.is_empty()
            || self.tree
            || self.timeline.is_some()
            || self.trace.is_some()
            || self.pause_on_exec.is_some()
            || self.pid.is_some()
            || self.all
            || self.otlp.is_some()
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
                    "--watch {w:?} names no event: give fork, exec, exit, setid, signal, syscall or syscall=NAME,... (comma-separated)"
                );
            }
            cfg.add_watch_list(w)
                .with_context(|| format!("--watch {w}"))?;
        }
        let mut shown = EventMask::NONE;
        for (on, m) in [
            (cfg.fork, EventMask::FORK),
            (cfg.exec, EventMask::EXEC | EventMask::EXEC_FAILED),
            (cfg.exit, EventMask::EXIT),
            (cfg.setid, EventMask::SETID),
            (cfg.signals, EventMask::SIGNAL | EventMask::SIGNAL_DELIVER),
            (
                cfg.syscalls != SyscallWatch::None,
                EventMask::SYSCALL | EventMask::SYSCALL_RETURN,
            ),
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
        // Syscall results and failed execs, where the engine can trap the return path.
        cfg.results = true;
        for d in &self.deny {
            cfg.deny
                .push(parse_deny(d).with_context(|| format!("--deny-syscall {d}"))?);
        }
        let block_signals = self
            .block_signal
            .iter()
            .map(|b| BlockRule::parse(b).with_context(|| format!("--block-signal {b}")))
            .collect::<Result<Vec<_>>>()?;
        if !block_signals.is_empty() {
            cfg.may_deny.extend(BlockSignals::syscalls());
        }
        for (option, path) in [("--timeline", &self.timeline), ("--trace", &self.trace)] {
            if let Some(path) = path {
                check_destination(option, path)?;
            }
        }
        let scope = match (self.pid, self.all) {
            (Some(p), _) => Scope::Pid(p, self.follow),
            (None, true) => Scope::All,
            (None, false) => Scope::Command,
        };
        let otlp = match &self.otlp {
            Some(url) => {
                let mask = if shown == EventMask::NONE {
                    EventMask::LIFECYCLE
                } else {
                    shown
                };
                Some((ornament_otlp::OtlpConfig::new(url)?, mask))
            }
            None => None,
        };
        Ok(WatchPlan {
            block_signals,
            otlp,
            scope,
            cfg,
            format: self.format,
            output: self.output.clone(),
            tree: self.tree,
            timeline: self.timeline.clone(),
            trace: self.trace.clone(),
            trap: self.trap,
            shown,
            pause_on_exec: self.pause_on_exec.clone(),
        })
    }
}

/// Refuse, before the guest boots, a `--timeline`/`--trace` destination that cannot be
/// written: a directory, or one whose directory does not exist.
fn check_destination(option: &str, path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!(
            "{option} {}: is a directory; give a file name",
            path.display()
        );
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "{option} {}: the directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    Ok(())
}

impl WatchPlan {
    /// What of this plan only QEMU offers, said as the user asked it, if anything:
    /// every-syscall watching (our VMM traps fentry sites, one per named syscall) or a
    /// QEMU trap backend.
    pub fn needs_qemu(&self) -> Option<String> {
        if self.cfg.syscalls == SyscallWatch::All {
            return Some("--watch syscall (every syscall)".to_owned());
        }
        match self.trap {
            TrapChoice::Auto => None,
            TrapChoice::Plugin => Some("--trap plugin".to_owned()),
            TrapChoice::Gdbstub => Some("--trap gdbstub".to_owned()),
        }
    }
}

impl TrapChoice {
    /// The engine's own name for the choice.
    pub fn engine(self) -> ornament_qemu::TrapChoice {
        match self {
            TrapChoice::Auto => ornament_qemu::TrapChoice::Auto,
            TrapChoice::Plugin => ornament_qemu::TrapChoice::Plugin,
            TrapChoice::Gdbstub => ornament_qemu::TrapChoice::Gdbstub,
        }
    }
}

/// Ornaments a program adds to `ornament run`'s own (see `examples/exec_counter.rs`).
pub struct Extra {
    /// Syscalls its ornaments must see (watched as with `--watch syscall=NAME`; shown only
    /// when the user asked for them too).
    pub syscalls: Vec<String>,
    /// Syscalls its ornaments may deny: their probes are placed and held for it.
    pub may_deny: Vec<String>,
    /// Attach the ornaments; called once the session exists, with the view of the
    /// command's process tree (for [`scoped`]). They come right after the command
    /// tracker, so the event writer and the summary report what they decided.
    pub attach: AttachFn,
}

/// Attaches a program's ornaments to the session ([`Extra::attach`]).
pub type AttachFn = Box<dyn FnOnce(&mut Session, &CommandView) + Send>;

impl std::fmt::Debug for Extra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Extra")
            .field("syscalls", &self.syscalls)
            .field("may_deny", &self.may_deny)
            .finish_non_exhaustive()
    }
}

impl WatchPlan {
    /// Trap what `extra`'s ornaments need.
    pub fn extend(&mut self, extra: &Extra) {
        if !extra.syscalls.is_empty() {
            match &mut self.cfg.syscalls {
                SyscallWatch::All => {}
                SyscallWatch::Named(names) => names.extend(extra.syscalls.iter().cloned()),
                none @ SyscallWatch::None => *none = SyscallWatch::Named(extra.syscalls.clone()),
            }
        }
        self.cfg.may_deny.extend(extra.may_deny.iter().cloned());
    }
}

/// What a run's ornaments recorded, for the end of the run.
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
    /// Events the writer, the tree and the summary never got because their queue was
    /// full (a sink slower than the guest).
    pub dropped: u64,
    /// What the OTLP export delivered, with `--otlp`; events its own queue dropped
    /// before the SDK got them are counted as emitted and not delivered.
    pub otlp: Option<ornament_otlp::ExportReport>,
    /// Why the timeline page or the trace could not be written, if one could not.
    pub pages_failed: Option<String>,
}

/// A timeline's destinations, staged before the run, written at its end.
struct TimelineOut {
    view: TimelineView,
    page: Option<StagedFile>,
    trace: Option<StagedFile>,
}

impl TimelineOut {
    /// Render and write the page and the trace; the first error, naming its option and
    /// file.
    fn write(self) -> Result<(), String> {
        let data = self.view.snapshot();
        let mut failed = None;
        let outputs: [(&str, Option<StagedFile>, RenderFn); 2] = [
            ("--timeline", self.page, timeline::render::page),
            ("--trace", self.trace, timeline::render::trace),
        ];
        for (option, staged, render) in outputs {
            let Some(staged) = staged else { continue };
            let path = staged.path().to_path_buf();
            let written = render(&data, &path)
                .and_then(|text| staged.commit(text.as_bytes()).map(|()| text.len()));
            match written {
                Ok(bytes) => eprintln!(
                    "ornament: {option} {}: {} processes, {} kB",
                    path.display(),
                    data.lanes.len(),
                    bytes.div_ceil(1024)
                ),
                Err(e) => {
                    failed.get_or_insert(format!("{option} {e}"));
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

/// A rendering of a timeline: the page or the trace.
type RenderFn = fn(
    &timeline::TimelineData,
    &Path,
) -> Result<String, ornament_introspect::ornament::TimelineError>;

/// The handles of the CLI's ornaments, read at the end.
struct Outputs {
    command: CommandView,
    tree: Option<TreeView>,
    tree_out: Option<PathBuf>,
    timeline: Option<TimelineOut>,
    output: Option<OutputHealth>,
    summary: Arc<std::sync::Mutex<SummaryCounts>>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
    otlp: Option<(
        Arc<ornament_otlp::ExportStats>,
        Arc<std::sync::atomic::AtomicU64>,
    )>,
    began: Instant,
}

impl Outputs {
    /// Print the tree, write the timeline; what the ornaments recorded.
    fn finish(self) -> Record {
        let pages_failed = self.timeline.and_then(|t| t.write().err());
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
        Record {
            command: self.command.clone(),
            output: self.output.clone(),
            summary: self
                .summary
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            elapsed: self.began.elapsed(),
            dropped: self.dropped.load(std::sync::atomic::Ordering::Relaxed),
            otlp: self.otlp.as_ref().map(|(stats, dropped)| {
                let mut r = stats.report();
                r.emitted += dropped.load(std::sync::atomic::Ordering::Relaxed);
                r
            }),
            pages_failed,
        }
    }
}

/// Attach `ornament run`'s ornaments, in delivery order: the command tracker first (every
/// later one sees the command's tree as it is at the event), then a program's own, deny,
/// pause-on-exec, and last the consumers: the tree, the event writer and the summary
/// (they report what the others decided), behind one bounded queue.
/// A failing event output sets `stop`.
fn attach_ornaments(
    session: &mut Session,
    plan: &WatchPlan,
    stop: &Arc<AtomicBool>,
    extra: Option<Extra>,
) -> Result<Outputs> {
    let tracker = CommandTracker::new(CommandMatch {
        parent_tgid: 1,
        argv_prefix: COMMAND_ARGV.iter().map(|s| (*s).to_owned()).collect(),
    });
    let command = tracker.view();
    let scope = plan.scope;
    session.attach(Box::new(tracker));
    if let Some(extra) = extra {
        (extra.attach)(session, &command);
    }
    let rules = session.probes().deny_rules().clone();
    if !rules.is_empty() {
        session.attach(scoped(scope, &command, Box::new(DenySyscalls::new(rules))));
    }
    if !plan.block_signals.is_empty() {
        // Unscoped: it learns every process's comm, and guards every target.
        let p = session.profile();
        let b = BlockSignals::new(plan.block_signals.clone(), |n| p.syscall_nr(n));
        session.attach(Box::new(b));
    }
    if let Some(path) = &plan.pause_on_exec {
        session.set_exec_acts(true);
        session.attach(Box::new(PauseOnExec::new(path.clone())));
    }
    // The consumers (tree, writer, summary) run behind a bounded queue on a thread of
    // their own: a slow output never holds a vCPU. Their scope is decided here, inline.
    let mut consumers: Vec<Box<dyn Ornament>> = Vec::new();
    let tree = plan.tree.then(|| {
        let t = ProcessTree::new();
        let v = t.view();
        consumers.push(Box::new(t));
        v
    });
    let timeline = if plan.timeline.is_some() || plan.trace.is_some() {
        let stage = |option: &str, path: &Option<PathBuf>| {
            path.as_deref()
                .map(StagedFile::create)
                .transpose()
                .with_context(|| option.to_owned())
        };
        let page = stage("--timeline", &plan.timeline)?;
        let trace = stage("--trace", &plan.trace)?;
        let run = session.run_info();
        let t = Timeline::new(Some(run.run_id.clone()), run.host.clone());
        let view = t.view();
        consumers.push(Box::new(t));
        Some(TimelineOut { view, page, trace })
    } else {
        None
    };
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
            Format::Ecs => ornament::Format::Ecs,
        };
        let writer = EventWriter::new(out, format)
            .for_run(session.run_info().clone())
            .with_mask(plan.shown)
            .stop_on_error(stop.clone());
        let health = writer.health();
        consumers.push(Box::new(writer));
        Some(health)
    };
    let summary = RunSummary::new();
    let counts = summary.counts();
    consumers.push(Box::new(summary));
    let consumers = Consumers::new(consumers, CONSUMER_QUEUE);
    let dropped = consumers.dropped();
    session.attach(scoped(scope, &command, Box::new(consumers)));
    // The exporter has a queue of its own: a slow collector never holds the writer.
    let otlp = match &plan.otlp {
        Some((cfg, mask)) => {
            let export = ornament_otlp::OtlpExport::new(cfg, session.run_info().clone(), *mask)?;
            let stats = export.stats();
            let queue = Consumers::new(vec![Box::new(export)], CONSUMER_QUEUE);
            let dropped = queue.dropped();
            session.attach(scoped(scope, &command, Box::new(queue)));
            Some((stats, dropped))
        }
        None => None,
    };
    Ok(Outputs {
        command,
        tree,
        tree_out: plan.output.clone(),
        timeline,
        output,
        summary: counts,
        dropped,
        otlp,
        began: Instant::now(),
    })
}

/// The kernel as found in the running guest.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// Its profile.
    pub profile: Arc<Profile>,
    /// Where KASLR put it.
    pub layout: KernelLayout,
    /// Registers of vCPU 0 in kernel mode (their page tables), where known.
    pub regs: ornament_engine::Regs,
}

/// Watch a run on `engine` (stopped, kernel identified): place and arm the probes of
/// `plan`, serve `control` if asked, run the guest to its end delivering every hit.
///
/// The outer error: the session could not start. Otherwise what the ornaments recorded
/// (kept even when the run failed) and how the run ended.
pub fn watch(
    engine: &mut dyn Engine,
    kernel: &Kernel,
    plan: &WatchPlan,
    control: Option<&Path>,
    limits: &Limits,
    extra: Option<Extra>,
) -> Result<(Record, Result<GuestExit>)> {
    let release = &kernel.profile.kernel.release;
    let mut session = Session::new(&*engine, kernel.profile.clone(), kernel.layout, &plan.cfg)
        .with_context(|| format!("kernel {release}"))?;
    for w in session.probes().warnings() {
        eprintln!("ornament: warning: {w}");
    }
    let outputs = attach_ornaments(&mut session, plan, &limits.stop, extra)?;
    session.on_notice(|n| match n {
        Notice::Paused { by_ornament: true } => eprintln!(
            "ornament: an ornament paused the guest; resume it with `ornament resume --control SOCKET`"
        ),
        Notice::Paused { by_ornament: false } => eprintln!("ornament: guest paused"),
        Notice::Resumed => eprintln!("ornament: guest resumed"),
    });
    let _server = match control {
        Some(path) => {
            let view = GuestView {
                ram: engine.memory(),
                profile: kernel.profile.clone(),
                layout: kernel.layout,
                vcpus: engine.vcpu_count(),
                control: session.control(),
                regs: kernel.regs,
            };
            Some(crate::control::serve(path, Arc::new(view))?)
        }
        None => None,
    };
    session.arm(engine)?;
    let ran = session.run(engine, limits).map_err(anyhow::Error::from);
    session.finish();
    Ok((outputs.finish(), ran))
}
