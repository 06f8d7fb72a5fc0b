//! `ornament`: boot a Linux guest and watch its tasks from outside.
//!
//! The CLI is thin: each subcommand is one call into the library crates, and
//! errors are printed with their whole chain. Exit status: the guest command's
//! own status for `run`; 125 when ornament itself fails; 130 on Ctrl-C.

use clap::{Parser, Subcommand};
use ornament::{cmd, EXIT_ORNAMENT_FAILED};
use std::process::ExitCode;

/// Watch the tasks of a Linux guest from outside: boot it, run a command in it,
/// and see every fork, exec, exit and syscall without an agent in the guest.
#[derive(Debug, Parser)]
#[command(name = "ornament", version, about, long_about = None)]
struct Cli {
    /// More log output on stderr (-v: info, -vv: debug, -vvv: trace); or set ORNAMENT_LOG.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a guest, run COMMAND in it (or a short demo), exit with its status.
    Run(Box<cmd::run::RunArgs>),
    /// Build or list guest images.
    #[command(subcommand)]
    Image(cmd::image::ImageCmd),
    /// Say what this host can do: KVM kind, QEMU version, which engine `auto` picks.
    Doctor(cmd::doctor::DoctorArgs),
    /// List a running guest's processes from outside (via `run --control SOCKET`).
    Ps(cmd::ps::PsArgs),
    /// Let a guest paused by an ornament (or the control socket) run again.
    Resume(cmd::resume::ResumeArgs),
    /// Generate kernel profiles (symbols and struct offsets).
    #[command(subcommand)]
    Profile(cmd::profile::ProfileCmd),
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("ORNAMENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; a usage error is
            // ornament failing before it started (clap would exit 2).
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_ORNAMENT_FAILED)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Run(a) => cmd::run::run(*a),
        Command::Image(c) => cmd::image::run(c).map(|()| 0),
        Command::Doctor(a) => cmd::doctor::run(a).map(|()| 0),
        Command::Ps(a) => cmd::ps::run(a).map(|()| 0),
        Command::Resume(a) => cmd::resume::run(a).map(|()| 0),
        Command::Profile(c) => cmd::profile::run(c).map(|()| 0),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let mut msg = format!("ornament: error: {e}");
            for cause in e.chain().skip(1) {
                msg.push_str(&format!("\n  caused by: {cause}"));
            }
            eprintln!("{msg}");
            if e.downcast_ref::<cmd::run::Interrupted>().is_some() {
                return ExitCode::from(cmd::run::EXIT_INTERRUPTED);
            }
            ExitCode::from(EXIT_ORNAMENT_FAILED)
        }
    }
}
