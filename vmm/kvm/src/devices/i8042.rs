//! The i8042 keyboard controller, reduced to what we need: command 0xfe resets the CPU.

use super::{DevicesError, PioDevice, PioEffect};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Sets a flag when vm-superio's i8042 triggers a reset.
#[derive(Debug, Clone, Default)]
struct ResetFlag(Arc<AtomicBool>);

impl vm_superio::Trigger for ResetFlag {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// vm-superio's `I8042Device`, wired to report a reset as [`PioEffect::Reset`].
#[derive(Debug)]
pub struct I8042 {
    dev: vm_superio::I8042Device<ResetFlag>,
    flag: ResetFlag,
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl I8042 {
    /// A fresh controller.
    pub fn new() -> Self {
        let flag = ResetFlag::default();
        Self {
            dev: vm_superio::I8042Device::new(flag.clone()),
            flag,
        }
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = u8::try_from(offset).map_or(0, |o| self.dev.read(o));
        data.fill(v);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Result<PioEffect, DevicesError> {
        if let (Ok(o), Some(&v)) = (u8::try_from(offset), data.first()) {
            // Infallible trigger.
            let _ = self.dev.write(o, v);
        }
        Ok(if self.flag.0.swap(false, Ordering::SeqCst) {
            PioEffect::Reset
        } else {
            PioEffect::None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{I8042, I8042_CMD_RESET_CPU, I8042_COMMAND_PORT};

    #[test]
    fn only_the_reset_command_resets() {
        let mut d = super::I8042::new();
        let cmd = I8042_COMMAND_PORT - I8042.base;
        assert_eq!(d.write(cmd, &[0x20]).expect("write"), PioEffect::None);
        assert_eq!(
            d.write(0, &[I8042_CMD_RESET_CPU]).expect("write"),
            PioEffect::None
        );
        assert_eq!(
            d.write(cmd, &[I8042_CMD_RESET_CPU]).expect("write"),
            PioEffect::Reset
        );
        assert_eq!(d.write(cmd, &[0x20]).expect("write"), PioEffect::None);
    }
}
