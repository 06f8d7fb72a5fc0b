//! The host clock that hits are timed with: `CLOCK_MONOTONIC` in nanoseconds. It is one
//! clock for every process of the host, so a hit the TCG plugin stamps in QEMU's process
//! is placed exactly on the host's own timeline, with no handshake to estimate.

/// `CLOCK_MONOTONIC` now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}

/// The host's wall clock when `CLOCK_MONOTONIC` read `mono_ns`.
pub fn wall_clock_at_monotonic(mono_ns: u64) -> std::time::SystemTime {
    let ago = std::time::Duration::from_nanos(monotonic_ns().saturating_sub(mono_ns));
    std::time::SystemTime::now()
        .checked_sub(ago)
        .unwrap_or(std::time::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_moves_forward_and_maps_to_the_wall_clock() {
        let a = monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = monotonic_ns();
        assert!(b >= a + 2_000_000, "{a} {b}");
        let then = wall_clock_at_monotonic(a);
        let ago = std::time::SystemTime::now()
            .duration_since(then)
            .expect("in the past");
        assert!(ago >= std::time::Duration::from_millis(2), "{ago:?}");
        assert!(ago < std::time::Duration::from_secs(5), "{ago:?}");
    }
}
