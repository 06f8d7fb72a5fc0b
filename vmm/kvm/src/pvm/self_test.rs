//! `ornament doctor`'s self-test: a tiny guest that needs every completion of compatibility
//! mode, run and checked against what a CPU would have done.

use super::{PvmShared, IDT_GATE_SIZE, MSR_LSTAR, MSR_SFMASK, MSR_STAR, PF_VECTOR};
use ornament_engine::PhysMemory;
use std::sync::Arc;

/// Why the PVM compatibility self-test failed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum SelfTestError {
    /// cannot set up the self-test guest
    Testing(#[source] crate::testing::TestingError),
    /// cannot write the self-test guest's tables
    Memory(#[source] crate::memory::MemoryError),
    /// cannot set the self-test guest's registers
    Registers(#[source] kvm_ioctls::Error),
    /// the self-test machine could not run
    Machine(#[source] crate::machine::MachineError),
    /// the self-test guest failed
    Vcpu(#[source] crate::vcpu::VcpuError),
    /// the self-test guest reported {got:x?}, expected {expected:x?}
    WrongReports {
        /// What it reported.
        got: Vec<u32>,
        /// What it should have.
        expected: Vec<u32>,
    },
}

/// What the self-test saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct SelfTestReport {
    /// Completions the VMM made (int3, fwait, clac/stac).
    pub completed: u64,
    /// Syscall entries completed.
    pub syscall_entries: u64,
    /// True when the host needed them (PVM); on hardware KVM nothing fails to emulate
    /// and the `syscall` enters kernel mode by itself.
    pub needed: bool,
}

/// Self-test guest, kernel part (loaded at `TEST_CODE_START`, CPL 0): `fwait`, `clac`,
/// `stac`, `int3` (its #BP handler increments R12), report R12 and RFLAGS.AC, then
/// `iretq` to user mode, where `mov eax, 110; syscall` enters `sys_entry`, which
/// reports CS.RPL, RCX (return RIP) and R11 (user RFLAGS) and resets.
const SELF_TEST_KERNEL: [u8; 0x110] = {
    let mut c = [0u8; 0x110];
    let start: [u8; 0x2c] = [
        0x45, 0x31, 0xe4, // xor r12d, r12d
        0x9b, // fwait
        0x0f, 0x01, 0xca, // clac
        0x0f, 0x01, 0xcb, // stac
        0xcc, // int3
        0x44, 0x89, 0xe0, // mov eax, r12d
        0xe7, 0xee, // out 0xee, eax   (report 1: #BP handled)
        0x9c, // pushfq
        0x58, // pop rax
        0xc1, 0xe8, 0x12, // shr eax, 18
        0x83, 0xe0, 0x01, // and eax, 1
        0xe7, 0xee, // out 0xee, eax   (report 2: AC after stac)
        0x6a, 0x33, // push 0x33        (user SS)
        0x68, 0xf0, 0x2f, 0x20, 0x00, // push 0x202ff0 (user RSP)
        0x6a, 0x02, // push 2           (RFLAGS)
        0x6a, 0x3b, // push 0x3b        (user CS)
        0x68, 0x00, 0x10, 0x20, 0x00, // push 0x201000 (user RIP)
        0x48, 0xcf, // iretq
    ];
    let sys_entry: [u8; 0x15] = [
        0x8c, 0xc8, // mov eax, cs
        0x83, 0xe0, 0x03, // and eax, 3
        0xe7, 0xee, // out 0xee, eax   (report 3: CPL)
        0x89, 0xc8, // mov eax, ecx
        0xe7, 0xee, // out 0xee, eax   (report 4: return RIP)
        0x44, 0x89, 0xd8, // mov eax, r11d
        0xe7, 0xee, // out 0xee, eax   (report 5: user RFLAGS)
        0xb0, 0xfe, // mov al, 0xfe
        0xe6, 0x64, // out 0x64, al    (i8042 reset: done)
        0xf4, // hlt
    ];
    let bp_handler: [u8; 5] = [
        0x41, 0xff, 0xc4, // inc r12d
        0x48, 0xcf, // iretq
    ];
    let pf_handler: [u8; 15] = [
        0x90, 0x90, 0x90, // nop x3 (as Linux's ASM_CLAC without SMAP)
        0xb8, 0xad, 0xde, 0x00, 0x00, // mov eax, 0xdead
        0xe7, 0xee, // out 0xee, eax   (a real #PF: the syscall was not completed)
        0xb0, 0xfe, // mov al, 0xfe
        0xe6, 0x64, // out 0x64, al
        0xf4, // hlt
    ];
    let mut i = 0;
    while i < start.len() {
        c[i] = start[i];
        i += 1;
    }
    i = 0;
    while i < sys_entry.len() {
        c[ST_SYS_ENTRY + i] = sys_entry[i];
        i += 1;
    }
    i = 0;
    while i < bp_handler.len() {
        c[ST_BP_HANDLER + i] = bp_handler[i];
        i += 1;
    }
    i = 0;
    while i < pf_handler.len() {
        c[ST_PF_HANDLER + i] = pf_handler[i];
        i += 1;
    }
    c
};
/// Self-test offsets in the kernel part.
const ST_SYS_ENTRY: usize = 0x80;
const ST_BP_HANDLER: usize = 0xc0;
const ST_PF_HANDLER: usize = 0x100;
/// Self-test user part, at [`ST_USER`] (a user-accessible 2 MiB page).
const SELF_TEST_USER: [u8; 9] = [
    0xb8, 0x6e, 0x00, 0x00, 0x00, // mov eax, 110
    0x0f, 0x05, // syscall
    0xeb, 0xf7, // jmp back
];
const ST_USER: u64 = 0x20_1000;
/// Length of the user code up to the end of its `syscall`.
const ST_USER_RET: u64 = 7;

/// Run a tiny guest that needs every completion of this mode (`fwait`, `clac`, `stac`,
/// `int3` in kernel mode, a user-mode `syscall`) and check it ran as a CPU would have
/// run it. For `ornament doctor`.
pub fn pvm_compat_self_test() -> Result<SelfTestReport, SelfTestError> {
    use crate::layout::{
        test_stack_top, PDE_START, PDPTE_START, PML4_START, TEST_CODE_START, TEST_DATA_START,
    };
    use crate::machine::RunControl;
    use crate::testing::TestGuest;
    use crate::vcpu::VcpuEvent;
    use vm_memory::GuestAddress;

    let guest = TestGuest::long_mode(&SELF_TEST_KERNEL);
    let mut m = guest.build(1).map_err(SelfTestError::Testing)?;
    let mem = m.vm.memory().clone();
    let w = |at: u64, b: &[u8]| {
        mem.write(GuestAddress(at), b)
            .map_err(SelfTestError::Memory)
    };
    w(ST_USER, &SELF_TEST_USER)?;
    // GDT: null, null, kernel code 0x10, kernel data 0x18, TSS 0x20 (16 bytes), user
    // data 0x30, user code 0x38 (both DPL 3).
    let gdt_at = TEST_DATA_START.0;
    let gdt: [u64; 8] = [
        0,
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x0080_8b00_0000_0067,
        0,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
    ];
    let gdt_bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    w(gdt_at, &gdt_bytes)?;
    // IDT: #BP (3) and #PF (14) gates, kernel CS, present interrupt gates.
    let idt_at = gdt_at + 0x100;
    let gate = |handler: u64| {
        let mut g = [0u8; 16];
        g[0..2].copy_from_slice(&handler.to_le_bytes()[0..2]);
        g[2] = 0x10;
        g[5] = 0x8e;
        g[6..8].copy_from_slice(&handler.to_le_bytes()[2..4]);
        g[8..12].copy_from_slice(&handler.to_le_bytes()[4..8]);
        g
    };
    let base = TEST_CODE_START.0;
    w(
        idt_at + 3 * IDT_GATE_SIZE,
        &gate(base + ST_BP_HANDLER as u64),
    )?;
    w(
        idt_at + PF_VECTOR * IDT_GATE_SIZE,
        &gate(base + ST_PF_HANDLER as u64),
    )?;
    // The TSS (at guest-physical 0, what the boot TR says): RSP0 at offset 4 for the
    // #PF from user mode.
    let rsp0 = test_stack_top(1).map_or(0, |a| a.0);
    w(4, &rsp0.to_le_bytes())?;
    // User access through PML4[0], PDPT[0] and the 2 MiB page at 2 MiB only.
    let user = |at: u64| -> Result<(), SelfTestError> {
        let mut b = [0u8; 8];
        mem.read_phys(ornament_engine::Gpa(at), &mut b)
            .map_err(|_| SelfTestError::WrongReports {
                got: Vec::new(),
                expected: Vec::new(),
            })?;
        w(at, &(u64::from_le_bytes(b) | 4).to_le_bytes())
    };
    user(PML4_START.0)?;
    user(PDPTE_START.0)?;
    user(PDE_START.0 + 8)?;
    let fd = m.vcpus[0].fd();
    let mut sregs = fd.get_sregs().map_err(SelfTestError::Registers)?;
    sregs.gdt.base = gdt_at;
    sregs.gdt.limit = 8 * 8 - 1;
    sregs.idt.base = idt_at;
    sregs.idt.limit = u16::try_from(16 * IDT_GATE_SIZE - 1).unwrap_or(u16::MAX);
    sregs.efer |= 1; // EFER.SCE: syscall enabled
    fd.set_sregs(&sregs).map_err(SelfTestError::Registers)?;
    let msr = |index, data| kvm_bindings::kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let msrs = kvm_bindings::Msrs::from_entries(&[
        msr(MSR_STAR, (0x28 << 48) | (0x10 << 32)),
        msr(MSR_LSTAR, base + ST_SYS_ENTRY as u64),
        msr(MSR_SFMASK, 0x4_7700),
    ])
    .expect("three MSRs fit");
    fd.set_msrs(&msrs).map_err(SelfTestError::Registers)?;
    let shared = Arc::new(PvmShared::default());
    shared.want_hook();
    m.pvm = Some(shared);
    m.complete_instructions = true;
    let reports = std::sync::Mutex::new(Vec::new());
    let out = m
        .run(
            None,
            &|_, ev| {
                if let VcpuEvent::Report(v) = ev {
                    reports.lock().unwrap_or_else(|p| p.into_inner()).push(v);
                }
                false
            },
            &RunControl::new(),
        )
        .map_err(SelfTestError::Machine)?;
    let o = out.into_iter().next().expect("one vCPU");
    o.result.map_err(SelfTestError::Vcpu)?;
    let got = reports.into_inner().unwrap_or_else(|p| p.into_inner());
    let ret = u32::try_from(ST_USER + ST_USER_RET).unwrap_or(0);
    let expected = vec![1, 1, 0, ret, 2];
    // The user RFLAGS in R11: PVM runs user mode with IF set whatever `iretq` popped,
    // and some hosts add RF; compare without those two bits.
    let norm = |v: &[u32]| {
        let mut v = v.to_vec();
        if let Some(r11) = v.get_mut(4) {
            *r11 &= !((1 << 16) | (1 << 9));
        }
        v
    };
    if norm(&got) != expected {
        return Err(SelfTestError::WrongReports { got, expected });
    }
    Ok(SelfTestReport {
        completed: o.stats.completed,
        syscall_entries: o.stats.syscall_entries,
        needed: o.stats.completed > 0 || o.stats.syscall_entries > 0,
    })
}
