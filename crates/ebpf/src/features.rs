//! Kernel feature detection, run before anything is loaded or attached: a kernel without a
//! needed feature gets an error naming it instead of a half-working datapath.

use std::os::fd::{FromRawFd, OwnedFd};

use crate::EbpfError;

/// What the running kernel offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// tcx links (`BPF_TCX_INGRESS`/`EGRESS`, Linux ≥ 6.6).
    pub tcx: bool,
}

/// Helpers every program of the datapath calls from `SCHED_CLS` programs, with the kernel
/// release that added them (for the error message).
const HELPERS: &[(u32, &str, &str)] = &[
    (
        libbpf_sys::BPF_FUNC_redirect_peer,
        "bpf_redirect_peer helper for tc programs",
        "Linux 5.10",
    ),
    (
        libbpf_sys::BPF_FUNC_skc_lookup_tcp,
        "bpf_skc_lookup_tcp helper for tc programs",
        "Linux 5.2",
    ),
    (
        libbpf_sys::BPF_FUNC_sk_assign,
        "bpf_sk_assign helper for tc programs",
        "Linux 5.7",
    ),
];

/// Probe the kernel. Missing helpers are an error; tcx is reported (the caller decides whether
/// the clsact fallback is acceptable).
pub fn probe() -> Result<Features, EbpfError> {
    for &(id, feature, since) in HELPERS {
        // SAFETY: plain probe call; a null opts pointer is allowed by libbpf.
        let rc = unsafe {
            libbpf_sys::libbpf_probe_bpf_helper(
                libbpf_sys::BPF_PROG_TYPE_SCHED_CLS,
                id,
                std::ptr::null(),
            )
        };
        match rc {
            1 => {}
            0 => {
                return Err(EbpfError::MissingFeature {
                    feature,
                    detail: format!("the kernel does not offer it (needs {since} or later)"),
                });
            }
            e => {
                return Err(EbpfError::MissingFeature {
                    feature,
                    detail: format!(
                        "probing it failed: {} (is the agent privileged: CAP_BPF, CAP_NET_ADMIN?)",
                        std::io::Error::from_raw_os_error(e.saturating_abs())
                    ),
                });
            }
        }
    }
    Ok(Features { tcx: probe_tcx()? })
}

/// tcx: create a tcx link for a trivial program on ifindex 0. A kernel with tcx looks the
/// device up and answers ENODEV; one without rejects the attach type (EINVAL). Nothing is
/// attached anywhere either way.
fn probe_tcx() -> Result<bool, EbpfError> {
    let prog = trivial_sched_cls_program("meshcni_probe")?;
    let opts = libbpf_sys::bpf_link_create_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_link_create_opts>() as libbpf_sys::size_t,
        ..Default::default()
    };
    use std::os::fd::AsRawFd;
    // SAFETY: valid program fd and options struct.
    let rc = unsafe {
        libbpf_sys::bpf_link_create(prog.as_raw_fd(), 0, libbpf_sys::BPF_TCX_INGRESS, &opts)
    };
    if rc >= 0 {
        // SAFETY: the kernel returned a new fd we own; closing it detaches the link.
        drop(unsafe { OwnedFd::from_raw_fd(rc) });
        return Ok(true);
    }
    Ok(-rc == libc::ENODEV)
}

#[repr(C)]
struct RawInsn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// Load a two-instruction `SCHED_CLS` program (`return TC_ACT_UNSPEC`, i.e. "next") named
/// `name`. Used by the tcx probe; tests use it as a foreign program on a shared hook.
pub fn trivial_sched_cls_program(name: &str) -> Result<OwnedFd, EbpfError> {
    let insns = [
        // r0 = -1 (TC_ACT_UNSPEC / TCX_NEXT)
        RawInsn {
            code: 0xb7,
            regs: 0,
            off: 0,
            imm: -1,
        },
        // exit
        RawInsn {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ];
    let cname = std::ffi::CString::new(name)
        .map_err(|_| EbpfError::Conflict(format!("program name {name:?} contains NUL")))?;
    let license = c"Dual BSD/GPL";
    // SAFETY: `insns` is a valid array of 8-byte BPF instructions with the kernel's layout.
    let rc = unsafe {
        libbpf_sys::bpf_prog_load(
            libbpf_sys::BPF_PROG_TYPE_SCHED_CLS,
            cname.as_ptr(),
            license.as_ptr(),
            insns.as_ptr().cast::<libbpf_sys::bpf_insn>(),
            insns.len() as libbpf_sys::size_t,
            std::ptr::null_mut(),
        )
    };
    if rc < 0 {
        return Err(EbpfError::errno(
            format!("load trivial tc program {name}"),
            rc,
        ));
    }
    // SAFETY: the kernel returned a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(rc) })
}
