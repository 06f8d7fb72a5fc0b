//! Writing an ornament: this one counts the execs of each binary and makes `mkdir` of
//! any path under `/tmp/deny/` fail with EPERM, in the command's process tree. It runs
//! inside ornament's own `run` (the same arguments), on either engine:
//!
//! ```text
//! cargo run --example exec_counter -- -- sh -c 'mkdir -p /tmp/deny; mkdir /tmp/deny/x; ls /tmp/deny'
//! cargo run --example exec_counter -- --engine kvm --force -- sh -c '...'   # our VMM
//! ```
//!
//! An ornament sees every event its mask asks for, in attach order, and may act on the
//! ones where acting is possible: here a syscall entry, which the session holds because
//! the ornament said it may deny `mkdir` and `mkdirat` ([`Extra::may_deny`]).

use clap::Parser;
use ornament::cmd::run::{run_with, RunArgs};
use ornament::watch::Extra;
use ornament_introspect::event::{Event, EventMask};
use ornament_introspect::ornament::{Decision, Ornament};
use ornament_introspect::session::{scoped, Scope};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

/// Where `mkdir` is refused.
const DENIED_UNDER: &str = "/tmp/deny/";
/// EPERM.
const EPERM: i32 = 1;

/// Counts execs per binary; denies `mkdir`/`mkdirat` under [`DENIED_UNDER`].
struct ExecCounter {
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
    denied: Arc<Mutex<u64>>,
}

impl Ornament for ExecCounter {
    fn name(&self) -> &str {
        "exec-counter"
    }

    fn mask(&self) -> EventMask {
        EventMask::EXEC | EventMask::SYSCALL
    }

    fn on_event(&mut self, ev: &Event, d: &mut Decision) {
        match ev {
            Event::Exec(x) => {
                let binary = x.filename.clone().unwrap_or_else(|| "?".into());
                let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
                *counts.entry(binary).or_default() += 1;
            }
            Event::Syscall(s)
                if matches!(s.name.as_deref(), Some("mkdir" | "mkdirat"))
                    && s.path
                        .as_deref()
                        .is_some_and(|p| p.starts_with(DENIED_UNDER))
                    && d.deny(EPERM) =>
            {
                *self.denied.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            }
            _ => {}
        }
    }
}

/// `ornament run`'s arguments.
#[derive(Debug, Parser)]
#[command(
    name = "exec_counter",
    about = "ornament run with an exec-counting, mkdir-denying ornament"
)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let counts = Arc::new(Mutex::new(BTreeMap::new()));
    let denied = Arc::new(Mutex::new(0));
    let ornament = ExecCounter {
        counts: counts.clone(),
        denied: denied.clone(),
    };
    let extra = Extra {
        syscalls: vec!["mkdir".into(), "mkdirat".into()],
        may_deny: vec!["mkdir".into(), "mkdirat".into()],
        // Only the command and its descendants: not the boot, not ornament's /init.
        attach: Box::new(move |session, command| {
            session.attach(scoped(Scope::Command, command, Box::new(ornament)));
        }),
    };
    let status = run_with(cli.run, Some(extra));
    for (binary, n) in counts.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        eprintln!("exec-counter: {n:>4} {binary}");
    }
    eprintln!(
        "exec-counter: {} mkdir under {DENIED_UNDER} denied",
        denied.lock().unwrap_or_else(|p| p.into_inner())
    );
    match status {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("exec_counter: error: {e:#}");
            ExitCode::from(ornament::EXIT_ORNAMENT_FAILED)
        }
    }
}
