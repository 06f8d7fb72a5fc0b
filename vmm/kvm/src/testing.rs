//! Hand-written test guests and their harness: `TestGuest { code, load_addr, mode, regs }`
//! booted straight into long mode on identity page tables, and [`kvm_usable`], the
//! probe tests gate on (`ornament_test_gate::require!("usable /dev/kvm", kvm_usable())`).
//!
//! Used by the crate's KVM tests, the trap self-test of [`crate::support`] and the
//! benchmark; every guest is machine code with one comment per instruction.

use crate::boot::{long_mode_sregs, write_gdt, write_identity_page_tables, BootError};
use crate::devices::{DevicesError, PioBus, Serial, SharedBuffer, I8042};
use crate::layout::{
    test_stack_top, I8042 as I8042_PORTS, SERIAL_COM1, TEST_CODE_START, TEST_MEM_SIZE,
};
use crate::machine::Machine;
use crate::memory::{KvmMemory, MemoryError};
use crate::vm::{KvmVm, VmError};
use kvm_bindings::kvm_regs;
use std::sync::{Arc, Mutex};
use vm_memory::GuestAddress;

/// Why a test guest could not be set up or run.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum TestingError {
    /// cannot set up test guest memory
    Memory(#[source] MemoryError),
    /// cannot write the boot structures
    Boot(#[source] BootError),
    /// cannot set up the VM
    Vm(#[source] VmError),
    /// cannot set up the devices
    Devices(#[source] DevicesError),
    /// cannot set the registers of vCPU {0}
    Registers(u32, #[source] kvm_ioctls::Error),
    /// test guests have stacks for at most {0} vCPUs
    TooManyVcpus(u64),
}

/// The CPU mode a test guest starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 64-bit long mode, identity-mapped 4 GiB, flat segments.
    Long,
}

/// A hand-written guest.
#[derive(Debug, Clone)]
pub struct TestGuest {
    /// Machine code.
    pub code: Vec<u8>,
    /// Where the code goes (and where RIP starts).
    pub load_addr: GuestAddress,
    /// CPU mode at the first instruction.
    pub mode: Mode,
    /// Initial general-purpose registers of every vCPU. The harness sets RIP to
    /// `load_addr` and RFLAGS to 2, RSP to the vCPU's own stack and R15 to its index.
    pub regs: kvm_regs,
}

impl TestGuest {
    /// A long-mode guest at [`TEST_CODE_START`] with zeroed registers.
    pub fn long_mode(code: &[u8]) -> Self {
        Self {
            code: code.to_vec(),
            load_addr: TEST_CODE_START,
            mode: Mode::Long,
            regs: kvm_regs::default(),
        }
    }

    /// Memory, VM, devices (COM1 into a buffer, i8042) and `vcpus` vCPUs ready to run.
    pub fn build(&self, vcpus: u32) -> Result<Machine, TestingError> {
        let mem = KvmMemory::new(TEST_MEM_SIZE).map_err(TestingError::Memory)?;
        mem.write(self.load_addr, &self.code)
            .map_err(TestingError::Memory)?;
        match self.mode {
            Mode::Long => {
                write_gdt(&mem).map_err(TestingError::Boot)?;
                write_identity_page_tables(&mem).map_err(TestingError::Boot)?;
            }
        }
        let vm = KvmVm::new(mem).map_err(TestingError::Vm)?;
        let serial = SharedBuffer::default();
        let mut bus = PioBus::new();
        bus.insert(
            SERIAL_COM1,
            Arc::new(Mutex::new(Serial::new(Box::new(serial.clone()), None))),
        )
        .map_err(TestingError::Devices)?;
        bus.insert(I8042_PORTS, Arc::new(Mutex::new(I8042::new())))
            .map_err(TestingError::Devices)?;
        let mut all = Vec::new();
        for i in 0..vcpus {
            let vcpu = vm.create_vcpu(i).map_err(TestingError::Vm)?;
            let e = |e| TestingError::Registers(i, e);
            let mut sregs = vcpu.fd().get_sregs().map_err(e)?;
            long_mode_sregs(&mut sregs);
            vcpu.fd().set_sregs(&sregs).map_err(e)?;
            let stack =
                test_stack_top(u64::from(i)).ok_or(TestingError::TooManyVcpus(u64::from(i)))?;
            let regs = kvm_regs {
                rip: self.load_addr.0,
                rflags: 2,
                rsp: stack.0,
                r15: u64::from(i),
                ..self.regs
            };
            vcpu.fd().set_regs(&regs).map_err(e)?;
            all.push(vcpu);
        }
        Ok(Machine {
            vm,
            vcpus: all,
            bus,
            serial,
            stop_all_on_exit: false,
            complete_instructions: false,
            pvm: None,
            serial2: SharedBuffer::default(),
        })
    }
}

/// Whether KVM can run test guests here; `Err` says why not.
pub fn kvm_usable() -> Result<(), VmError> {
    let kvm = crate::vm::open_kvm()?;
    crate::vm::check_kvm(&kvm)
}

/// The test guests' machine code.
#[rustfmt::skip]
pub mod guests {
    /// Print "Hello from long mode\n" on COM1, then reset through the i8042.
    pub const HELLO: &[u8] = &[
        0x48, 0x8d, 0x35, 0x11, 0x00, 0x00, 0x00, // lea rsi, [rip+0x11]  (msg)
        0x66, 0xba, 0xf8, 0x03,                   // mov dx, 0x3f8
        0xac,                                     // 1: lodsb
        0x84, 0xc0,                               // test al, al
        0x74, 0x03,                               // jz 2f
        0xee,                                     // out dx, al
        0xeb, 0xf8,                               // jmp 1b
        0xb0, 0xfe,                               // 2: mov al, 0xfe
        0xe6, 0x64,                               // out 0x64, al  (i8042 reset)
        0xf4,                                     // hlt  (not reached)
        b'H', b'e', b'l', b'l', b'o', b' ', b'f', b'r', b'o', b'm', b' ',
        b'l', b'o', b'n', b'g', b' ', b'm', b'o', b'd', b'e', b'\n', 0,
    ];
    /// What [`HELLO`] prints.
    pub const HELLO_TEXT: &[u8] = b"Hello from long mode\n";

    /// Report 0x12345678 on the report port (a port-I/O exit), then reset.
    pub const REPORT: &[u8] = &[
        0xb8, 0x78, 0x56, 0x34, 0x12, // mov eax, 0x12345678
        0xe7, 0xee,                   // out 0xee, eax  (TEST_REPORT_PORT)
        0xb0, 0xfe,                   // mov al, 0xfe
        0xe6, 0x64,                   // out 0x64, al  (i8042 reset)
        0xf4,                         // hlt
    ];
    /// Offset of the `out 0xee, eax` in [`REPORT`].
    pub const REPORT_OUT_OFFSET: u64 = 5;

    /// Call `func(rcx, 0x100 + r15)` for rcx = N..1 (N from RCX; R15 = vCPU index),
    /// sum the results, report the low 32 bits of the sum, then reset.
    /// `func(a, b) = a + b` begins with the 5-byte fentry NOP at [`CALLS_FUNC_OFFSET`].
    pub const CALLS: &[u8] = &[
        0x45, 0x31, 0xe4,             // 0x00: xor r12d, r12d
        0x48, 0x89, 0xcf,             // 0x03: 1: mov rdi, rcx
        0xbe, 0x00, 0x01, 0x00, 0x00, // 0x06: mov esi, 0x100
        0x4c, 0x01, 0xfe,             // 0x0b: add rsi, r15
        0x51,                         // 0x0e: push rcx
        0xe8, 0x2c, 0x00, 0x00, 0x00, // 0x0f: call func  (0x40)
        0x59,                         // 0x14: pop rcx
        0x49, 0x01, 0xc4,             // 0x15: add r12, rax
        0x48, 0xff, 0xc9,             // 0x18: dec rcx
        0x75, 0xe6,                   // 0x1b: jnz 1b
        0x44, 0x89, 0xe0,             // 0x1d: mov eax, r12d
        0xe7, 0xee,                   // 0x20: out 0xee, eax  (TEST_REPORT_PORT)
        0xb0, 0xfe,                   // 0x22: mov al, 0xfe
        0xe6, 0x64,                   // 0x24: out 0x64, al  (i8042 reset)
        0xf4,                         // 0x26: hlt
        0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, // 0x27: padding
        0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc,
        0xcc, 0xcc, 0xcc, 0xcc,
        0x0f, 0x1f, 0x44, 0x00, 0x00, // 0x40: func: nopl 0x0(%rax,%rax,1)  (fentry NOP)
        0x48, 0x8d, 0x04, 0x37,       // 0x45: lea rax, [rdi+rsi]
        0xc3,                         // 0x49: ret
    ];
    /// Offset of `func` (its fentry NOP) in [`CALLS`].
    pub const CALLS_FUNC_OFFSET: u64 = 0x40;

    /// What [`CALLS`] reports on vCPU `index` for `n` calls, when each hit adds
    /// `rsi_delta` to the second argument.
    pub const fn calls_result(n: u64, index: u64, rsi_delta: u64) -> u32 {
        let sum = n * (n + 1) / 2 + n * (0x100 + index + rsi_delta);
        (sum & 0xffff_ffff) as u32
    }

    /// Exit `rcx` times on port 0x80 (no device: the bare exit round trip), then reset.
    pub const BARE_EXITS: &[u8] = &[
        0xe6, 0x80,       // 1: out 0x80, al  (POST_PORT, no device)
        0x48, 0xff, 0xc9, // dec rcx
        0x75, 0xf9,       // jnz 1b
        0xb0, 0xfe,       // mov al, 0xfe
        0xe6, 0x64,       // out 0x64, al  (i8042 reset)
        0xf4,             // hlt
    ];

    /// Spin forever (until the VMM stops the vCPU).
    pub const SPIN: &[u8] = &[
        0xeb, 0xfe, // 1: jmp 1b
    ];

    /// Load an IDT whose vector 3 reports 0xb9 and returns, execute `int3`, report
    /// 0x600d, reset. Built for `load` by [`breakpoint_guest`].
    const BREAKPOINT: &[u8] = &[
        0x0f, 0x01, 0x1d, 0x59, 0x00, 0x00, 0x00, // 0x00: lidt [rip+0x59]  (idtr at 0x60)
        0xcc,                                     // 0x07: int3
        0xb8, 0x0d, 0x60, 0x00, 0x00,             // 0x08: mov eax, 0x600d
        0xe7, 0xee,                               // 0x0d: out 0xee, eax
        0xb0, 0xfe,                               // 0x0f: mov al, 0xfe
        0xe6, 0x64,                               // 0x11: out 0x64, al  (i8042 reset)
        0xf4,                                     // 0x13: hlt
        0xb8, 0xb9, 0x00, 0x00, 0x00,             // 0x14: handler: mov eax, 0xb9
        0xe7, 0xee,                               // 0x19: out 0xee, eax
        0x48, 0xcf,                               // 0x1b: iretq
        0xcc, 0xcc, 0xcc,                         // 0x1d: padding
    ];
    /// Offset of the `int3` in [`breakpoint_guest`]'s code.
    pub const BREAKPOINT_INT3_OFFSET: u64 = 0x07;
    const BREAKPOINT_HANDLER: u64 = 0x14;
    const BREAKPOINT_IDT: usize = 0x20;
    const BREAKPOINT_IDTR: usize = 0x60;

    /// [`BREAKPOINT`] for load address `load`: the IDT (4 gates at 0x20, vector 3 an
    /// interrupt gate to the handler through the boot code selector 0x10) and the
    /// IDTR (limit 63, base) at 0x60.
    pub fn breakpoint_guest(load: u64) -> Vec<u8> {
        let mut code = BREAKPOINT.to_vec();
        code.resize(BREAKPOINT_IDTR + 10, 0);
        let h = load + BREAKPOINT_HANDLER;
        let mut gate = [0u8; 16];
        gate[0..2].copy_from_slice(&h.to_le_bytes()[0..2]); // offset 15:0
        gate[2..4].copy_from_slice(&0x10u16.to_le_bytes()); // code selector
        gate[5] = 0x8e; // present, DPL 0, 64-bit interrupt gate
        gate[6..8].copy_from_slice(&h.to_le_bytes()[2..4]); // offset 31:16
        gate[8..12].copy_from_slice(&h.to_le_bytes()[4..8]); // offset 63:32
        let at = BREAKPOINT_IDT + 3 * 16;
        code[at..at + 16].copy_from_slice(&gate);
        code[BREAKPOINT_IDTR..BREAKPOINT_IDTR + 2].copy_from_slice(&63u16.to_le_bytes());
        let base = load + BREAKPOINT_IDT as u64;
        code[BREAKPOINT_IDTR + 2..BREAKPOINT_IDTR + 10].copy_from_slice(&base.to_le_bytes());
        code
    }

    /// One `int3`, then reset.
    pub const INT3: &[u8] = &[
        0xcc,       // int3
        0xb0, 0xfe, // mov al, 0xfe
        0xe6, 0x64, // out 0x64, al  (i8042 reset)
        0xf4,       // hlt
    ];
}

#[cfg(test)]
mod tests {
    use super::guests::*;
    use crate::trap::patch::FENTRY_NOP;

    #[test]
    fn guest_code_shapes() {
        let f = usize::try_from(CALLS_FUNC_OFFSET).expect("small");
        assert_eq!(CALLS[f..f + 5], FENTRY_NOP);
        assert_eq!(CALLS.len(), 0x4a);
        assert_eq!(
            &HELLO[HELLO.len() - HELLO_TEXT.len() - 1..HELLO.len() - 1],
            HELLO_TEXT
        );
        assert_eq!(REPORT[5], 0xe7);
        assert_eq!(calls_result(3, 0, 0), 6 + 3 * 0x100);
        assert_eq!(calls_result(2, 1, 0x10), 3 + 2 * 0x111);
    }
}
