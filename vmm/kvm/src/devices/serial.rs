//! COM1: vm-superio's 16550 UART, with its output going to any writer.

use super::{DevicesError, PioDevice, PioEffect};
use std::io::Write;
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// The serial interrupt: an eventfd registered as an irqfd, or nothing (test guests).
#[derive(Debug)]
pub struct SerialIrq(Option<EventFd>, std::sync::atomic::AtomicU64);

impl vm_superio::Trigger for SerialIrq {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match &self.0 {
            Some(evt) => evt.write(1),
            None => Ok(()),
        }
    }
}

/// The writer the serial output goes to.
pub type SerialOut = Box<dyn Write + Send>;

/// vm-superio's `Serial`, writing guest output to `out`.
pub struct Serial(vm_superio::Serial<SerialIrq, vm_superio::serial::NoEvents, SerialOut>);

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial").finish_non_exhaustive()
    }
}

impl Serial {
    /// A UART writing to `out`, raising `irq` (if any) when it wants attention.
    pub fn new(out: SerialOut, irq: Option<EventFd>) -> Self {
        Self(vm_superio::Serial::new(
            SerialIrq(irq, std::sync::atomic::AtomicU64::new(0)),
            out,
        ))
    }
}

impl PioDevice for Serial {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = u8::try_from(offset).map_or(0, |o| self.0.read(o));
        if offset == 2 {
            tracing::trace!(iir = v, "serial IIR read");
        }
        data.fill(v);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Result<PioEffect, DevicesError> {
        if let (Ok(o), Some(&v)) = (u8::try_from(offset), data.first()) {
            if o != 0 {
                tracing::trace!(
                    offset = o,
                    value = v,
                    interrupts = self
                        .0
                        .interrupt_evt()
                        .1
                        .load(std::sync::atomic::Ordering::Relaxed),
                    "serial register write"
                );
            }
            self.0.write(o, v).map_err(|e| match e {
                vm_superio::serial::Error::Trigger(e) | vm_superio::serial::Error::IOError(e) => {
                    DevicesError::Serial(e)
                }
                vm_superio::serial::Error::FullFifo => {
                    DevicesError::Serial(std::io::ErrorKind::WouldBlock.into())
                }
            })?;
        }
        Ok(PioEffect::None)
    }
}

/// A byte buffer several owners can write to and read from: serial output captured
/// by tests and by callers that want the console as bytes.
#[derive(Debug, Clone, Default)]
pub struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// A copy of everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmit_register_reaches_the_writer() {
        let buf = SharedBuffer::default();
        let mut s = Serial::new(Box::new(buf.clone()), None);
        for b in b"hi\n" {
            s.write(0, &[*b]).expect("THR write");
        }
        assert_eq!(buf.contents(), b"hi\n");
        // Line status register (offset 5): transmitter empty bits set.
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }
}
