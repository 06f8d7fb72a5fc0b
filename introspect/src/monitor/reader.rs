//! The reads of one hit: the task header and creds (from the engine's reads at the hit
//! where it made them, else from guest memory now), user strings, and the `begin_new_exec`
//! fallback's `bprm`.

use super::*;

pub(super) use crate::bytes::{low32, low32_signed};

/// A pointer read at the hit: `Some(Some(p))` a kernel address, `Some(None)` read but not a
/// kernel address (the field it leads to is unreadable), `None` not read.
pub(super) fn kptr_at_hit(v: Option<u64>) -> Option<Option<Gva>> {
    v.map(|p| Some(Gva(p)).filter(|&g| is_kernel_address(g)))
}

/// `comm` from its 16 bytes read at the hit, as [`VirtMem::read_cstr`] decodes it.
fn comm_at_hit(lo: Option<u64>, hi: Option<u64>, size: u64) -> Option<String> {
    if size != 16 {
        return None;
    }
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&lo?.to_le_bytes());
    b[8..].copy_from_slice(&hi?.to_le_bytes());
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    Some(crate::guest_text::decode(&b[..end]))
}

/// The last path component, cut to `TASK_COMM_LEN - 1` bytes (what exec sets `comm` to).
fn comm_of(filename: &str) -> String {
    let base = filename.rsplit('/').next().unwrap_or(filename);
    let mut end = base.len().min(15);
    while !base.is_char_boundary(end) {
        end -= 1;
    }
    base[..end].to_owned()
}

/// The reads of one hit.
pub(super) struct Reader<'r, 'k, 'v> {
    pub(super) reader: &'r TaskReader<'k>,
    pub(super) vm: &'r VirtMem<'v>,
    pub(super) hit: &'r ProbeHit,
    /// The hit's `MEM_HDR_EUID` slot holds the header's euid and egid.
    pub(super) euid_at_hit: bool,
}

impl Reader<'_, '_, '_> {
    /// A task's `comm` from its 16 bytes read at the hit (`None` where the profile's comm
    /// is another size, or a read is missing).
    pub(super) fn comm_at_hit(&self, lo: Option<u64>, hi: Option<u64>) -> Option<String> {
        let size = self.reader.offsets().comm_size;
        comm_at_hit(lo, hi, size)
    }

    pub(super) fn header(&self, task: Option<Gva>) -> TaskHeader {
        self.header_at_hit(task, false)
    }

    /// The header of `task`; with `at_hit`, the `MEM_HDR_*` values the engine read at the hit
    /// (which are `task`'s) are taken first, each field read now where they are missing.
    pub(super) fn header_at_hit(&self, task: Option<Gva>, at_hit: bool) -> TaskHeader {
        let mut h = TaskHeader {
            time_ns: self.hit.time_ns,
            vcpu: self.hit.vcpu,
            ..TaskHeader::default()
        };
        if let Some(t) = task {
            let (r, vm) = (self.reader, self.vm);
            let m = |i: usize| {
                at_hit
                    .then(|| self.hit.mem.get(i).copied().flatten())
                    .flatten()
            };
            h.pid = m(MEM_HDR_PID)
                .map(low32_signed)
                .or_else(|| r.pid(vm, t).ok());
            h.tgid = m(MEM_HDR_TGID)
                .map(low32_signed)
                .or_else(|| r.tgid(vm, t).ok());
            h.ppid = match kptr_at_hit(m(MEM_HDR_REAL_PARENT)) {
                Some(None) => None,
                Some(Some(_)) => m(MEM_HDR_PPID)
                    .map(low32_signed)
                    .or_else(|| r.ppid(vm, t).ok()),
                None => r.ppid(vm, t).ok(),
            };
            h.comm = comm_at_hit(
                m(MEM_HDR_COMM[0]),
                m(MEM_HDR_COMM[1]),
                r.offsets().comm_size,
            )
            .or_else(|| r.comm(vm, t).ok());
            [h.uid, h.gid, h.euid, h.egid] = self.creds(t, kptr_at_hit(m(MEM_HDR_CRED)), m);
        }
        h
    }

    /// (uid, gid, euid, egid) of `task`: from the hit's reads (`MEM_HDR_UID` and, unless
    /// its slot holds something else for this probe, `MEM_HDR_EUID`: each a pair of ids in
    /// one word) where it has them, else from the cred the hit read (`cred`; `Some(None)`:
    /// the task had none), else from `task->cred` now.
    pub(super) fn creds(
        &self,
        task: Gva,
        cred: Option<Option<Gva>>,
        m: impl Fn(usize) -> Option<u64>,
    ) -> [Option<u32>; 4] {
        if cred == Some(None) {
            return [None; 4];
        }
        let (r, vm) = (self.reader, self.vm);
        let o = r.offsets();
        let split = |v: Option<u64>, paired: bool| match v {
            Some(v) => (Some(low32(v)), paired.then(|| low32(v >> 32))),
            None => (None, None),
        };
        let (uid, gid) = split(m(MEM_HDR_UID), o.cred_gid == o.cred_uid.wrapping_add(4));
        let euid_read = self.euid_at_hit.then(|| m(MEM_HDR_EUID)).flatten();
        let (euid, egid) = split(euid_read, o.cred_egid == o.cred_euid.wrapping_add(4));
        let ids = [uid, gid, euid, egid];
        if ids.iter().all(Option::is_some) {
            return ids;
        }
        let now = match cred {
            Some(Some(c)) => r.creds_of(vm, c).ok(),
            _ => r.creds(vm, task).ok(),
        };
        std::array::from_fn(|i| ids[i].or(now.map(|c| c[i])))
    }

    /// A NUL-terminated string at user address `at` of `task`'s address space.
    pub(super) fn user_string(&self, task: Gva, at: u64) -> Option<String> {
        let mm = self.reader.mm(self.vm, task).ok()??;
        let uvm = self.reader.user_vm(self.vm, mm).ok()?;
        uvm.read_cstr(Gva(at), MAX_PATH_BYTES).ok().map(|s| s.text)
    }

    pub(super) fn exec_from_bprm(
        &self,
        off: Option<BprmOffsets>,
        bprm: Option<Gva>,
        current: Option<Gva>,
    ) -> ExecEvent {
        let mut ev = ExecEvent {
            task: self.header(current),
            cwd: current.and_then(|t| self.reader.cwd(self.vm, t).ok().flatten()),
            ..ExecEvent::default()
        };
        let (Some(off), Some(bprm)) = (off, bprm) else {
            ev.argv_truncated = true;
            return ev;
        };
        let vm = self.vm;
        ev.filename = vm
            .read_ptr(bprm.wrapping_add(off.filename))
            .ok()
            .filter(|&p| is_kernel_address(p))
            .and_then(|p| vm.read_cstr(p, MAX_PATH_BYTES).ok())
            .map(|s| s.text);
        if let Some(f) = &ev.filename {
            ev.task.comm = Some(comm_of(f));
        }
        let argc = vm.read_u32(bprm.wrapping_add(off.argc)).unwrap_or(0);
        let start = vm.read_u64(bprm.wrapping_add(off.p)).ok();
        let mm = vm
            .read_ptr(bprm.wrapping_add(off.mm))
            .ok()
            .filter(|&p| is_kernel_address(p));
        let uvm = mm.and_then(|mm| self.reader.user_vm(vm, mm).ok());
        let (Some(uvm), Some(mut at)) = (uvm, start) else {
            ev.argv_truncated = argc > 0;
            return ev;
        };
        let budget = usize::try_from(Limits::default().max_argv_bytes).unwrap_or(usize::MAX);
        let mut used = 0usize;
        for _ in 0..argc.min(u32::try_from(MAX_ARGV_ENTRIES).unwrap_or(u32::MAX)) {
            let Ok(s) = uvm.read_cstr(Gva(at), budget - used) else {
                ev.argv_truncated = true;
                return ev;
            };
            used += s.text.len() + 1;
            at = at.wrapping_add(s.text.len() as u64 + 1);
            let cut = s.truncated;
            ev.argv.push(s.text);
            if cut || used >= budget {
                ev.argv_truncated = true;
                return ev;
            }
        }
        ev.argv_truncated = usize::try_from(argc).unwrap_or(usize::MAX) > ev.argv.len();
        ev
    }
}
