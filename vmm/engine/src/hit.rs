//! [2] A probe hit: the one record every trap backend produces.

use crate::regs::Regs;
use serde::{Deserialize, Serialize};

/// Identifies one armed probe; chosen by whoever arms it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProbeId(pub u32);

/// A vCPU reached an armed probe address.
///
/// Identical whichever engine or trap backend produced it, so the events built
/// from it are identical too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeHit {
    /// Which probe.
    pub probe: ProbeId,
    /// The vCPU index (0-based) that hit it.
    pub vcpu: u32,
    /// Per-engine sequence number, strictly increasing in delivery order.
    pub seq: u64,
    /// Host monotonic time of the hit, nanoseconds since the engine started.
    pub time_ns: u64,
    /// Registers at the probe address (rip == the probe address).
    pub regs: Regs,
    /// True when the vCPU is held until the hit is answered.
    pub held: bool,
    /// Values of the memory reads the probe asked for, read at the hit (the
    /// TCG plugin does them in its callback; `None` where not asked or not readable).
    pub mem: [Option<u64>; crate::wire::MAX_MEM_READS],
    /// The byte range the probe asked for, read at the hit (the TCG plugin; `None` where
    /// not asked or its start and end reads failed).
    pub bytes: Option<crate::wire::HitBytes>,
}
