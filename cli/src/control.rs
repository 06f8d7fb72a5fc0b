//! The control socket (placeholder until the control server lands).

use crate::guest::GuestView;
use std::path::Path;
use std::sync::Arc;

/// A running control server.
#[derive(Debug)]
pub struct ControlServer;

/// Serve the control socket at `path`.
pub fn serve(path: &Path, view: Arc<GuestView>) -> anyhow::Result<ControlServer> {
    let _ = view;
    anyhow::bail!(
        "--control {}: the control socket is not implemented yet",
        path.display()
    )
}
