//! [7] What an ornament decided, sent back to the engine for one hit.

use serde::{Deserialize, Serialize};

/// The decision for one probe hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Action {
    /// Let the vCPU run on.
    #[default]
    Continue,
    /// Stop the whole guest until it is resumed.
    PauseGuest,
    /// At a syscall-entry probe: do not run the syscall; it returns `-errno`.
    DenySyscall {
        /// Positive errno value, 1..=4095.
        errno: i32,
    },
}
