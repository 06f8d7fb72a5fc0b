//! The `ornament` command as a library: the binary (`main.rs`) only parses arguments and
//! prints errors. A program of its own can run the same `ornament run` with ornaments of
//! its own attached ([`cmd::run::run_with`], [`watch::Extra`]; see
//! `examples/exec_counter.rs`).
//!
//! Nothing here knows how an engine traps: the CLI chooses an engine (`select`), boots
//! it (`cmd::run`, `kvm_run`), identifies the kernel (`identify`), and hands the engine to
//! introspect's watch session (`watch`) with its ornaments; `status` decides the exit
//! status from what the session saw.

pub mod banner;
pub mod cmd;
pub mod control;
pub mod guest;
pub mod identify;
pub mod kvm_run;
pub mod select;
pub mod status;
pub mod watch;

/// Exit status when ornament itself fails (as `docker run` does).
pub const EXIT_ORNAMENT_FAILED: u8 = 125;
