//! `ornament resume`: let a guest paused by an ornament run again.

use anyhow::{bail, Result};
use std::path::PathBuf;

/// Resume a guest that an ornament (or `pause` on the control socket) stopped.
#[derive(Debug, clap::Args)]
pub struct ResumeArgs {
    /// Control socket of the run (`ornament run --control SOCKET`).
    #[arg(long, value_name = "SOCKET")]
    control: PathBuf,
}

/// Run resume.
pub fn run(a: ResumeArgs) -> Result<()> {
    let (_, v) = super::ps::request(&a.control, r#"{"cmd":"resume"}"#)?;
    if v["ok"] != true {
        bail!(
            "{}: {}",
            a.control.display(),
            v["error"].as_str().unwrap_or("error")
        );
    }
    if v["resumed"] == true {
        println!("resumed");
    } else {
        println!("the guest was not paused");
    }
    Ok(())
}
