//! `podns`: finding a known pod's netns again. Pure table tests of the cgroup parser, then real
//! namespaces (root): a fake proc root (a private directory of `<pid>/{cgroup,stat,ns/net}`
//! whose `ns/net` links to a test netns), a private netns directory (never `/run/netns`
//! itself: other jobs' namespaces live there), and the real `/proc` with a process we spawn
//! inside a test netns.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::TestNetns;
use meshcni_netx::podns::{
    FoundNetns, NetnsFinder, NetnsId, PodNetnsQuery, netns_id, netns_id_of_fd, pod_uid_from_cgroup,
};
use meshcni_netx::{NetxError, run_in_netns};

const UID_A: &str = "2c48913c-b29f-11e7-9350-020968147796";
const UID_B: &str = "72f7f152-440c-66ac-9084-e0fc1d8a910c";
const UID_C: &str = "daa5c7ee-3484-4533-af39-3591564fd03e";
const CTR: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";

// ----- cgroup parsing (pure) -------------------------------------------------------------------

#[test]
fn pod_uid_from_cgroup_table() {
    let a = Some(UID_A.to_string());
    let b = Some(UID_B.to_string());
    let a_us = UID_A.replace('-', "_");
    let b_us = UID_B.replace('-', "_");
    let cases: Vec<(&str, String, Option<String>)> = vec![
        (
            "v2 cgroupfs burstable",
            format!("0::/kubepods/burstable/pod{UID_A}/{CTR}\n"),
            a.clone(),
        ),
        (
            "v2 cgroupfs besteffort, no trailing newline",
            format!("0::/kubepods/besteffort/pod{UID_A}/{CTR}"),
            a.clone(),
        ),
        (
            "v2 cgroupfs guaranteed (no QoS level)",
            format!("0::/kubepods/pod{UID_A}/{CTR}\n"),
            a.clone(),
        ),
        (
            "v2 systemd containerd",
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{a_us}.slice/cri-containerd-{CTR}.scope\n"
            ),
            a.clone(),
        ),
        (
            "v2 systemd guaranteed crio",
            format!("0::/kubepods.slice/kubepods-pod{a_us}.slice/crio-{CTR}.scope\n"),
            a.clone(),
        ),
        (
            "v2 systemd pod slice itself (pause process of some runtimes)",
            format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{b_us}.slice\n"
            ),
            b.clone(),
        ),
        (
            "kind node (kubelet- prefixed systemd slices)",
            format!(
                "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{b_us}.slice/cri-containerd-{CTR}.scope\n"
            ),
            b.clone(),
        ),
        (
            "colon-separated systemd form",
            format!("0::/kubepods-besteffort-pod{b_us}.slice:cri-containerd:{CTR}\n"),
            b.clone(),
        ),
        (
            "docker-in-docker cgroupfs",
            format!("0::/docker/{CTR}/kubepods/besteffort/pod{UID_A}/{CTR}\n"),
            a.clone(),
        ),
        (
            "seen from inside a cgroup namespace",
            format!("0::/../../pod{UID_A}/{CTR}\n"),
            a.clone(),
        ),
        (
            "systemd slice seen from inside a cgroup namespace",
            format!("0::/../../kubepods-burstable-pod{a_us}.slice/cri-containerd-{CTR}.scope\n"),
            a.clone(),
        ),
        (
            "upper-case UID is normalised",
            format!("0::/kubepods/burstable/pod{}/{CTR}\n", UID_A.to_uppercase()),
            a.clone(),
        ),
        (
            "v1 multi-line, all controllers agree",
            format!(
                "12:pids:/kubepods/burstable/pod{UID_A}/{CTR}\n\
                 11:memory:/kubepods/burstable/pod{UID_A}/{CTR}\n\
                 10:cpu,cpuacct:/kubepods/burstable/pod{UID_A}/{CTR}\n\
                 1:name=systemd:/kubepods/burstable/pod{UID_A}/{CTR}\n\
                 0::/\n"
            ),
            a.clone(),
        ),
        (
            "v1 systemd multi-line with a non-pod named hierarchy",
            format!(
                "5:devices:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{a_us}.slice/cri-containerd-{CTR}.scope\n\
                 1:name=systemd:/system.slice/containerd.service\n"
            ),
            a.clone(),
        ),
        (
            "v1 lines naming two different pods",
            format!(
                "11:memory:/kubepods/burstable/pod{UID_A}/{CTR}\n\
                 10:cpu:/kubepods/burstable/pod{UID_B}/{CTR}\n"
            ),
            None,
        ),
        ("host init", "0::/init.scope\n".to_string(), None),
        (
            "host service",
            "0::/system.slice/containerd.service\n".to_string(),
            None,
        ),
        (
            "user session",
            "0::/user.slice/user-0.slice/session-3.scope\n".to_string(),
            None,
        ),
        (
            "plain docker container",
            format!("0::/system.slice/docker-{CTR}.scope\n"),
            None,
        ),
        (
            "v1 root",
            "12:pids:/\n11:memory:/\n1:name=systemd:/\n".to_string(),
            None,
        ),
        (
            "pod-like directory outside kubepods",
            format!("0::/system.slice/pod{UID_A}/{CTR}\n"),
            None,
        ),
        (
            "pod-like slice without kubepods prefix",
            format!("0::/machine.slice/machine-pod{a_us}.slice\n"),
            None,
        ),
        ("empty file", String::new(), None),
        (
            "no colons",
            format!("/kubepods/burstable/pod{UID_A}/{CTR}\n"),
            None,
        ),
        (
            "UID too short",
            format!("0::/kubepods/burstable/pod{}/{CTR}\n", &UID_A[1..]),
            None,
        ),
        (
            "non-hex UID",
            format!(
                "0::/kubepods/burstable/pod{}/{CTR}\n",
                UID_A.replace('c', "x")
            ),
            None,
        ),
        (
            "mixed UID separators",
            format!(
                "0::/kubepods-burstable-pod{}.slice\n",
                UID_A.replacen('-', "_", 1)
            ),
            None,
        ),
        (
            "text glued before pod",
            format!("0::/kubepods/burstable/xpod{UID_A}/{CTR}\n"),
            None,
        ),
        (
            "non-ASCII around the UID",
            format!("0::/kubepods/burstable/pod{UID_A}é/{CTR}\n"),
            None,
        ),
    ];
    for (name, text, want) in cases {
        assert_eq!(pod_uid_from_cgroup(&text), want, "case {name:?}: {text:?}");
    }
}

// ----- fixtures ---------------------------------------------------------------------------------

static DIRS: AtomicUsize = AtomicUsize::new(0);

/// A private directory, removed (with its symlinks, not their targets) on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "mcni-podns-{}-{}-{tag}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// `<dir>/<name>` → `target`.
    fn link(&self, name: &str, target: &Path) {
        std::os::unix::fs::symlink(target, self.0.join(name)).expect("symlink into temp dir");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fake proc root: `<pid>/cgroup`, `<pid>/stat` (with the given start time) and
/// `<pid>/ns/net` → a netns file.
struct FakeProc(TempDir);

impl FakeProc {
    fn new() -> FakeProc {
        let dir = TempDir::new("proc");
        // Non-process entries a real proc root has.
        std::fs::create_dir(dir.path().join("sys")).expect("mkdir sys");
        std::fs::write(dir.path().join("uptime"), "1.0 1.0\n").expect("write uptime");
        FakeProc(dir)
    }

    fn root(&self) -> &Path {
        self.0.path()
    }

    fn add(&self, pid: u32, cgroup: &str, starttime: u64, netns: &Path) {
        let dir = self.root().join(pid.to_string());
        std::fs::create_dir_all(dir.join("ns")).expect("mkdir <pid>/ns");
        std::fs::write(dir.join("cgroup"), cgroup).expect("write cgroup");
        // Fields 3..=21 are filler; field 22 is the start time. The command name has spaces
        // and a ')' to exercise the parser.
        let filler = vec!["0"; 18].join(" ");
        let stat = format!("{pid} (fake (pod) proc) S {filler} {starttime} 4096 10 0\n");
        std::fs::write(dir.join("stat"), stat).expect("write stat");
        std::os::unix::fs::symlink(netns, dir.join("ns/net")).expect("symlink ns/net");
    }
}

fn cgroupfs(uid: &str) -> String {
    format!("0::/kubepods/burstable/pod{uid}/{CTR}\n")
}

fn systemd(uid: &str) -> String {
    format!(
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CTR}.scope\n",
        uid.replace('-', "_")
    )
}

const HOST_CGROUP: &str = "0::/system.slice/containerd.service\n";

/// A test netns holding `ips` on `lo` (left down: addresses are listed either way).
fn netns_with(ips: &[&str]) -> TestNetns {
    let ns = TestNetns::new_lo_down();
    for ip in ips {
        if ip.contains(':') {
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{ip}/128"),
                "dev",
                "lo",
                "nodad",
            ]);
        } else {
            ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
        }
    }
    ns
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn id_of(ns: &TestNetns) -> NetnsId {
    netns_id(&ns.path()).expect("netns id of a test netns")
}

fn found_id(found: &BTreeMap<String, FoundNetns>, uid: &str) -> NetnsId {
    let f = found
        .get(uid)
        .unwrap_or_else(|| panic!("pod {uid} not found; found {found:?}"));
    // The returned fd refers to the same namespace as the reported id.
    assert_eq!(netns_id_of_fd(f.file.as_fd()).expect("fd id"), f.id);
    f.id
}

// ----- identity ---------------------------------------------------------------------------------

#[test]
fn netns_id_names_the_namespace_not_the_path() {
    let a = netns_with(&[]);
    let b = netns_with(&[]);
    let dir = TempDir::new("ids");
    dir.link("alias", &a.path());
    let id = id_of(&a);
    assert_eq!(
        netns_id(&dir.path().join("alias")).expect("via symlink"),
        id
    );
    let file = std::fs::File::open(a.path()).expect("open netns");
    assert_eq!(netns_id_of_fd(file.as_fd()).expect("via fd"), id);
    assert_ne!(id_of(&b), id);

    let finder = NetnsFinder::new("/proc", vec![]).expect("finder");
    assert_eq!(
        netns_id(Path::new("/proc/self/ns/net")).expect("own netns"),
        finder.host_netns()
    );

    let regular = dir.path().join("regular");
    std::fs::write(&regular, "x").expect("write");
    let err = netns_id(&regular).expect_err("regular file");
    assert!(matches!(err, NetxError::NotANetns { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&regular.display().to_string()),
        "{err}"
    );
    let err = netns_id_of_fd(std::fs::File::open(&regular).expect("open").as_fd())
        .expect_err("regular fd");
    assert!(matches!(err, NetxError::NotANetns { .. }), "{err:?}");
    let missing = dir.path().join("missing");
    let err = netns_id(&missing).expect_err("missing");
    assert!(matches!(err, NetxError::NetnsOpen { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );

    let err = NetnsFinder::new(dir.path().join("no-proc"), vec![]).expect_err("missing proc");
    assert!(err.to_string().contains("no-proc"), "{err}");
}

// ----- step 1: procfs by cgroup -------------------------------------------------------------------

#[test]
fn procfs_cgroup_match_verified_by_ip_one_entry_per_netns() {
    let pa = netns_with(&["10.91.0.1", "fd00:91::1"]);
    let pb = netns_with(&["10.91.0.2"]);
    let proc = FakeProc::new();
    proc.add(1, "0::/init.scope\n", 1, Path::new("/proc/self/ns/net"));
    proc.add(100, &cgroupfs(UID_A), 10, &pa.path());
    proc.add(101, &cgroupfs(UID_A), 20, &pa.path());
    proc.add(102, &cgroupfs(UID_A), 30, &pa.path());
    proc.add(200, &systemd(UID_B), 15, &pb.path());
    let finder = NetnsFinder::new(proc.root(), vec![]).expect("finder");
    let ips_a = [ip("fd00:91::1")];
    let ips_b = [ip("10.91.0.2"), ip("fd00:91::2")];
    let (found, stats) = finder
        .find_with_stats(&[
            PodNetnsQuery {
                uid: UID_A,
                ips: &ips_a,
            },
            // Queried with underscores: still the same pod.
            PodNetnsQuery {
                uid: &UID_B.replace('-', "_"),
                ips: &ips_b,
            },
        ])
        .expect("find");
    assert_eq!(found_id(&found, UID_A), id_of(&pa));
    assert_eq!(found_id(&found, &UID_B.replace('-', "_")), id_of(&pb));
    let src = &found[UID_A].source;
    assert!(
        src.contains("/100/ns/net"),
        "oldest process names it: {src}"
    );
    assert!(src.contains(&format!("cgroup of pod uid {UID_A}")), "{src}");
    assert!(src.contains("fd00:91::1"), "{src}");
    assert_eq!(stats.processes, 5);
    assert_eq!(stats.pod_processes, 4);
    assert_eq!(
        stats.start_times_read, 0,
        "one netns per pod: no ordering needed"
    );
    assert_eq!(stats.netns_entered, 2, "each netns entered once: {stats:?}");
    assert_eq!(stats.by_cgroup, 2);
    assert_eq!(
        stats.netns_files, 0,
        "no fallback when everything was found"
    );
}

#[test]
fn procfs_oldest_process_wins_by_start_time_not_pid() {
    let p1 = netns_with(&["10.92.0.1"]);
    let p2 = netns_with(&["10.92.0.1"]);
    let ips = [ip("10.92.0.1")];
    let query = [PodNetnsQuery {
        uid: UID_A,
        ips: &ips,
    }];

    let proc = FakeProc::new();
    proc.add(300, &cgroupfs(UID_A), 50, &p1.path());
    proc.add(200, &cgroupfs(UID_A), 900, &p2.path());
    let (found, stats) = NetnsFinder::new(proc.root(), vec![])
        .expect("finder")
        .find_with_stats(&query)
        .expect("find");
    assert_eq!(found_id(&found, UID_A), id_of(&p1));
    assert_eq!(stats.start_times_read, 2);

    let proc = FakeProc::new();
    proc.add(300, &cgroupfs(UID_A), 900, &p1.path());
    proc.add(200, &cgroupfs(UID_A), 50, &p2.path());
    let found = NetnsFinder::new(proc.root(), vec![])
        .expect("finder")
        .find(&query)
        .expect("find");
    assert_eq!(found_id(&found, UID_A), id_of(&p2));
}

#[test]
fn procfs_host_netns_is_skipped() {
    // "Host" is the netns the finder was created in: a test netns that also holds the pod IP.
    let host = netns_with(&["10.93.0.1"]);
    let pod = netns_with(&["10.93.0.1"]);
    let proc = FakeProc::new();
    proc.add(10, &cgroupfs(UID_A), 1, &host.path());
    proc.add(20, &cgroupfs(UID_A), 2, &pod.path());
    let ips = [ip("10.93.0.1")];
    let query = [PodNetnsQuery {
        uid: UID_A,
        ips: &ips,
    }];

    let finder = run_in_netns(&host.path(), || NetnsFinder::new(proc.root(), vec![]))
        .expect("enter host netns")
        .expect("finder");
    assert_eq!(finder.host_netns(), id_of(&host));
    let found = finder.find(&query).expect("find");
    assert_eq!(found_id(&found, UID_A), id_of(&pod));

    // Control: from the real host netns the older process's netns is the one picked.
    let found = NetnsFinder::new(proc.root(), vec![])
        .expect("finder")
        .find(&query)
        .expect("find");
    assert_eq!(found_id(&found, UID_A), id_of(&host));
}

#[test]
fn procfs_ip_mismatch_is_rejected_and_a_younger_verified_netns_is_used() {
    let decoy = netns_with(&["10.94.0.9"]);
    let pod = netns_with(&["10.94.0.1"]);
    let ips = [ip("10.94.0.1")];
    let query = [PodNetnsQuery {
        uid: UID_A,
        ips: &ips,
    }];

    // Only a netns without the pod's IP: nothing.
    let proc = FakeProc::new();
    proc.add(30, &cgroupfs(UID_A), 1, &decoy.path());
    let (found, stats) = NetnsFinder::new(proc.root(), vec![])
        .expect("finder")
        .find_with_stats(&query)
        .expect("find");
    assert!(found.is_empty(), "{found:?}");
    assert_eq!(stats.netns_entered, 1);

    // The oldest process's netns lacks the IP, a younger one has it.
    proc.add(31, &cgroupfs(UID_A), 5, &pod.path());
    let found = NetnsFinder::new(proc.root(), vec![])
        .expect("finder")
        .find(&query)
        .expect("find");
    assert_eq!(found_id(&found, UID_A), id_of(&pod));
    assert!(found[UID_A].source.contains("/31/ns/net"));

    // A pod queried without any usable IP is never returned (nothing to verify with): every
    // netns with `lo` up holds 127.0.0.1.
    let lo_up = TestNetns::new();
    let proc = FakeProc::new();
    proc.add(32, &cgroupfs(UID_A), 1, &lo_up.path());
    let loopback = [ip("127.0.0.1"), ip("::1"), ip("fe80::1")];
    let found = NetnsFinder::new(proc.root(), vec![])
        .expect("finder")
        .find(&[PodNetnsQuery {
            uid: UID_A,
            ips: &loopback,
        }])
        .expect("find");
    assert!(found.is_empty(), "{found:?}");
}

// ----- step 2 / 1b: by IP -------------------------------------------------------------------------

#[test]
fn process_whose_cgroup_names_no_pod_is_found_by_ip() {
    let pod = netns_with(&["10.95.0.1"]);
    let proc = FakeProc::new();
    proc.add(40, HOST_CGROUP, 3, &pod.path());
    proc.add(41, HOST_CGROUP, 4, &pod.path());
    let ips = [ip("10.95.0.1")];
    let (found, stats) = NetnsFinder::new(proc.root(), vec![])
        .expect("finder")
        .find_with_stats(&[PodNetnsQuery {
            uid: UID_B,
            ips: &ips,
        }])
        .expect("find");
    assert_eq!(found_id(&found, UID_B), id_of(&pod));
    let src = &found[UID_B].source;
    assert!(
        src.contains("/ns/net") && src.contains("cgroup names no pod"),
        "{src}"
    );
    assert_eq!(stats.by_process_ip, 1);
    assert_eq!(stats.netns_entered, 1);
}

#[test]
fn netns_claimed_by_another_pods_cgroup_is_not_given_by_ip() {
    let other = netns_with(&["10.96.0.1"]);
    let proc = FakeProc::new();
    proc.add(50, &cgroupfs(UID_C), 1, &other.path());
    let dir = TempDir::new("claimed");
    dir.link("cni-other", &other.path());
    let ips = [ip("10.96.0.1")];
    let found = NetnsFinder::new(proc.root(), vec![dir.path().to_path_buf()])
        .expect("finder")
        .find(&[PodNetnsQuery {
            uid: UID_B,
            ips: &ips,
        }])
        .expect("find");
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn netns_dir_fallback_finds_pods_by_ip_and_never_returns_the_decoy() {
    let pa = netns_with(&["10.97.0.1", "fd00:97::1"]);
    let pb = netns_with(&["fd00:97::2"]);
    let decoy = netns_with(&["10.97.0.99"]);
    let dir = TempDir::new("netnsdir");
    dir.link("cni-aaaa", &pa.path());
    dir.link("cni-bbbb", &pb.path());
    dir.link("cni-decoy", &decoy.path());
    dir.link("host", Path::new("/proc/self/ns/net"));
    dir.link("uts", Path::new("/proc/self/ns/uts"));
    dir.link("dangling", &dir.path().join("nothing-here"));
    std::fs::write(dir.path().join("junk"), "not a netns").expect("write junk");
    let proc = FakeProc::new();
    let dirs = vec![
        dir.path().to_path_buf(),
        dir.path().join("missing-dir-is-empty"),
    ];
    let ips_a = [ip("10.97.0.1"), ip("fd00:97::1")];
    let ips_b = [ip("10.97.0.2"), ip("fd00:97::2")];
    let ips_z = [ip("10.97.0.50")];
    let (found, stats) = NetnsFinder::new(proc.root(), dirs)
        .expect("finder")
        .find_with_stats(&[
            PodNetnsQuery {
                uid: UID_A,
                ips: &ips_a,
            },
            PodNetnsQuery {
                uid: UID_B,
                ips: &ips_b,
            },
            PodNetnsQuery {
                uid: UID_C,
                ips: &ips_z,
            },
        ])
        .expect("find");
    assert_eq!(found_id(&found, UID_A), id_of(&pa));
    assert_eq!(found_id(&found, UID_B), id_of(&pb));
    assert!(!found.contains_key(UID_C), "{found:?}");
    assert!(found.values().all(|f| f.id != id_of(&decoy)));
    let src = &found[UID_A].source;
    assert!(
        src.starts_with(&dir.path().join("cni-aaaa").display().to_string()),
        "{src}"
    );
    assert!(
        src.contains("netns file") && src.contains("10.97.0.1"),
        "{src}"
    );
    assert_eq!(stats.by_netns_dir, 2);
    // pa, pb, decoy and the uts namespace (whose entry fails): the host netns is skipped.
    assert_eq!(stats.netns_entered, 4, "{stats:?}");
}

#[test]
fn fifo_in_a_netns_dir_does_not_hang_the_scan() {
    let pod = netns_with(&["10.99.0.1"]);
    let dir = TempDir::new("fifo");
    nix::unistd::mkfifo(&dir.path().join("a-fifo"), nix::sys::stat::Mode::S_IRUSR).expect("mkfifo");
    dir.link("b-pod", &pod.path());
    let proc = FakeProc::new();
    let finder = NetnsFinder::new(proc.root(), vec![dir.path().to_path_buf()]).expect("finder");
    // A blocking open of a FIFO with no writer never returns: run `find` on a thread and give
    // up waiting (failing the test) after a bound far above its normal few milliseconds.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ips = [ip("10.99.0.1")];
        let found = finder
            .find(&[PodNetnsQuery {
                uid: UID_A,
                ips: &ips,
            }])
            .map(|f| f.get(UID_A).map(|f| f.id));
        let _ = tx.send(found);
    });
    let found = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("find must not block on a FIFO in a netns directory");
    assert_eq!(found.expect("find"), Some(id_of(&pod)));
}

#[test]
fn ambiguous_ip_match_returns_nothing_and_the_fuller_match_wins() {
    let p1 = netns_with(&["10.98.0.1"]);
    let p2 = netns_with(&["10.98.0.1"]);
    let dir = TempDir::new("ambiguous");
    dir.link("one", &p1.path());
    dir.link("two", &p2.path());
    let proc = FakeProc::new();
    let finder = NetnsFinder::new(proc.root(), vec![dir.path().to_path_buf()]).expect("finder");
    let ips = [ip("10.98.0.1"), ip("fd00:98::1")];
    let query = [PodNetnsQuery {
        uid: UID_A,
        ips: &ips,
    }];
    let found = finder.find(&query).expect("find");
    assert!(
        found.is_empty(),
        "a tie must not be resolved by chance: {found:?}"
    );

    // The netns holding both of the pod's IPs beats the one holding one of them.
    p2.ip(&["-6", "addr", "add", "fd00:98::1/128", "dev", "lo", "nodad"]);
    let found = finder.find(&query).expect("find");
    assert_eq!(found_id(&found, UID_A), id_of(&p2));

    // One netns holding two queried pods' IPs is given to neither.
    let p3 = netns_with(&["10.98.0.3", "10.98.0.4"]);
    dir.link("three", &p3.path());
    let ips3 = [ip("10.98.0.3")];
    let ips4 = [ip("10.98.0.4")];
    let found = finder
        .find(&[
            PodNetnsQuery {
                uid: UID_B,
                ips: &ips3,
            },
            PodNetnsQuery {
                uid: UID_C,
                ips: &ips4,
            },
        ])
        .expect("find");
    assert!(found.is_empty(), "{found:?}");
}

// ----- the real /proc -----------------------------------------------------------------------------

/// Processes we started; killed (by their own pid) and reaped on drop.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `ip netns exec NAME sleep 120`, returned once the process has entered the namespace.
fn spawn_in(ns: &TestNetns) -> Child {
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "sleep", "120"])
        .spawn()
        .expect("spawn `ip netns exec … sleep` (tests need root and iproute2)");
    let want = id_of(ns);
    let link = PathBuf::from(format!("/proc/{}/ns/net", child.id()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while netns_id(&link).ok() != Some(want) {
        assert!(
            Instant::now() < deadline,
            "process {} never entered {}",
            child.id(),
            ns.name
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

/// A real cgroup laid out like kubelet's, under a private top directory of a cgroup hierarchy
/// (`/sys/fs/cgroup/systemd`, the v1 named hierarchy, or the v2 root), so a process moved into
/// it has a `/proc/<pid>/cgroup` line naming the pod. The directories are removed on drop
/// (after the processes in them are gone: see [`PodProcs`]).
struct PodCgroup {
    dirs: Vec<PathBuf>,
}

impl PodCgroup {
    fn new(uid: &str, systemd_form: bool) -> PodCgroup {
        let base = if Path::new("/sys/fs/cgroup/systemd/cgroup.procs").exists() {
            PathBuf::from("/sys/fs/cgroup/systemd")
        } else {
            PathBuf::from("/sys/fs/cgroup")
        };
        assert!(
            base.join("cgroup.procs").exists(),
            "no writable cgroup hierarchy at {} (test needs root and cgroupfs)",
            base.display()
        );
        let top = base.join(format!(
            "mcni-podns-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::SeqCst)
        ));
        let levels: Vec<String> = if systemd_form {
            let us = uid.replace('-', "_");
            vec![
                "kubepods.slice".into(),
                "kubepods-burstable.slice".into(),
                format!("kubepods-burstable-pod{us}.slice"),
                format!("cri-containerd-{CTR}.scope"),
            ]
        } else {
            vec![
                "kubepods".into(),
                "burstable".into(),
                format!("pod{uid}"),
                CTR.into(),
            ]
        };
        let mut dirs = vec![top.clone()];
        let mut dir = top;
        for level in levels {
            dir = dir.join(level);
            dirs.push(dir.clone());
        }
        let cg = PodCgroup { dirs };
        for d in &cg.dirs {
            std::fs::create_dir(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        cg
    }

    fn enter(&self, pid: u32) {
        let procs = self.dirs.last().expect("leaf").join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", procs.display()));
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for d in self.dirs.iter().rev() {
            // A process just reaped can keep a cgroup busy for a moment.
            for _ in 0..100 {
                match std::fs::remove_dir(d) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    _ => break,
                }
            }
        }
    }
}

/// Our processes and the cgroups they were moved into: processes are killed first (field
/// order), then the cgroups removed.
struct PodProcs {
    children: Children,
    cgroups: Vec<PodCgroup>,
}

/// An IPv6 address no other job on this machine uses (our pid in it).
fn unique_v6(n: u16) -> String {
    format!("fd6d:6373:{:x}:{n:x}::1", std::process::id() & 0xffff)
}

#[test]
fn real_proc_finds_a_process_netns_by_ip_and_ignores_bind_mount_only_netns() {
    let addr = unique_v6(1);
    let ns = netns_with(&[&addr]);
    let ips = [ip(&addr)];
    let query = [PodNetnsQuery {
        uid: UID_A,
        ips: &ips,
    }];
    let finder = NetnsFinder::new("/proc", vec![]).expect("finder over /proc");

    // Only the /run/netns bind mount holds it: not scanned, not found.
    let found = finder.find(&query).expect("find");
    assert!(found.is_empty(), "{found:?}");

    let mut children = Children(vec![spawn_in(&ns)]);
    let pid = children.0[0].id();
    let (found, stats) = finder.find_with_stats(&query).expect("find");
    assert_eq!(found_id(&found, UID_A), id_of(&ns));
    let src = &found[UID_A].source;
    assert!(src.starts_with(&format!("/proc/{pid}/ns/net")), "{src}");
    assert_eq!(stats.by_process_ip, 1);
    assert!(stats.processes > 1, "{stats:?}");

    // The returned fd keeps the namespace even after the process is gone.
    children.0[0].kill().expect("kill our sleep");
    children.0[0].wait().expect("reap our sleep");
    let file = &found[UID_A].file;
    assert_eq!(netns_id_of_fd(file.as_fd()).expect("fd"), id_of(&ns));
    let found = finder.find(&query).expect("find");
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn real_proc_finds_pods_by_cgroup_cgroupfs_and_systemd_layouts() {
    let (a6, b6) = (unique_v6(2), unique_v6(3));
    let pa = netns_with(&[&a6]);
    let pb = netns_with(&[&b6]);
    let procs = PodProcs {
        children: Children(vec![spawn_in(&pa), spawn_in(&pb), spawn_in(&pb)]),
        cgroups: vec![PodCgroup::new(UID_A, false), PodCgroup::new(UID_B, true)],
    };
    let pids: Vec<u32> = procs.children.0.iter().map(Child::id).collect();
    procs.cgroups[0].enter(pids[0]);
    procs.cgroups[1].enter(pids[1]);
    procs.cgroups[1].enter(pids[2]);
    let text = std::fs::read_to_string(format!("/proc/{}/cgroup", pids[1])).expect("cgroup");
    assert_eq!(pod_uid_from_cgroup(&text).as_deref(), Some(UID_B), "{text}");

    let ips_a = [ip(&a6)];
    let ips_b = [ip(&b6)];
    let finder = NetnsFinder::new("/proc", vec![]).expect("finder over /proc");
    let (found, stats) = finder
        .find_with_stats(&[
            PodNetnsQuery {
                uid: UID_A,
                ips: &ips_a,
            },
            PodNetnsQuery {
                uid: UID_B,
                ips: &ips_b,
            },
        ])
        .expect("find");
    assert_eq!(found_id(&found, UID_A), id_of(&pa));
    assert_eq!(found_id(&found, UID_B), id_of(&pb));
    assert_eq!(stats.by_cgroup, 2, "{stats:?}");
    assert_eq!(stats.pod_processes, 3, "{stats:?}");
    assert_eq!(stats.netns_entered, 2, "{stats:?}");
    let src = &found[UID_A].source;
    assert!(
        src.starts_with(&format!("/proc/{}/ns/net", pids[0])),
        "{src}"
    );
    assert!(src.contains("cgroup of pod uid"), "{src}");

    // The pod's IP moved elsewhere (stale status): its cgroup's netns is not returned, and the
    // netns claimed by its cgroup is not handed out by IP either.
    let wrong = [ip(&unique_v6(4))];
    let found = finder
        .find(&[PodNetnsQuery {
            uid: UID_A,
            ips: &wrong,
        }])
        .expect("find");
    assert!(found.is_empty(), "{found:?}");
    drop(procs);
}

// ----- scale: 200 pods ----------------------------------------------------------------------------

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// 200 pods, each in its own netns: by cgroup (fake proc root with a pause and an app process
/// per pod plus 300 host processes), by netns-dir file, and on the real /proc (one `sleep` per
/// netns) by process IP and then by cgroup. Checks every pod is found with one entry per netns
/// and prints the time of `find` (median of 5); run with `--nocapture` to see the numbers.
#[test]
fn two_hundred_pods_found_in_one_scan_each_netns_entered_once() {
    const PODS: usize = 200;
    let t0 = Instant::now();
    let uids: Vec<String> = (0..PODS)
        .map(|i| format!("0000{i:04x}-b29f-11e7-9350-020968147796"))
        .collect();
    let addrs: Vec<String> = (0..PODS).map(|i| unique_v6(0x100 + i as u16)).collect();
    let nss: Vec<TestNetns> = addrs.iter().map(|a| netns_with(&[a])).collect();
    let setup = t0.elapsed();
    let ips: Vec<[IpAddr; 1]> = addrs.iter().map(|a| [ip(a)]).collect();
    let query: Vec<PodNetnsQuery<'_>> = uids
        .iter()
        .zip(&ips)
        .map(|(uid, ips)| PodNetnsQuery { uid, ips })
        .collect();
    let check = |found: &BTreeMap<String, FoundNetns>| {
        assert_eq!(found.len(), PODS);
        for (uid, ns) in uids.iter().zip(&nss) {
            assert_eq!(found_id(found, uid), id_of(ns), "pod {uid}");
        }
    };

    // By cgroup.
    let proc = FakeProc::new();
    for (i, (uid, ns)) in uids.iter().zip(&nss).enumerate() {
        let pid = 10_000 + 2 * i as u32;
        proc.add(pid, &systemd(uid), 1000 + i as u64, &ns.path());
        proc.add(pid + 1, &systemd(uid), 2000 + i as u64, &ns.path());
    }
    for pid in 1..=300u32 {
        proc.add(
            pid,
            HOST_CGROUP,
            u64::from(pid),
            Path::new("/proc/self/ns/net"),
        );
    }
    let finder = NetnsFinder::new(proc.root(), vec![]).expect("finder");
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let (found, stats) = finder.find_with_stats(&query).expect("find");
        times.push(t.elapsed());
        check(&found);
        assert_eq!(stats.processes, 2 * PODS + 300);
        assert_eq!(stats.netns_entered, PODS, "{stats:?}");
        assert_eq!(stats.by_cgroup, PODS);
    }
    let by_cgroup = median(times);

    // By netns-dir file.
    let dir = TempDir::new("bench-dir");
    for (i, ns) in nss.iter().enumerate() {
        dir.link(&format!("cni-{i}"), &ns.path());
    }
    let empty = FakeProc::new();
    let finder = NetnsFinder::new(empty.root(), vec![dir.path().to_path_buf()]).expect("finder");
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let (found, stats) = finder.find_with_stats(&query).expect("find");
        times.push(t.elapsed());
        check(&found);
        assert_eq!(stats.netns_entered, PODS, "{stats:?}");
        assert_eq!(stats.by_netns_dir, PODS);
    }
    let by_dir = median(times);

    // Real /proc, one `sleep` per netns: by process IP (cgroups name no pod), then by cgroup
    // (each process moved into a kubelet-style cgroup of its pod).
    let mut procs = PodProcs {
        children: Children(nss.iter().map(spawn_in).collect()),
        cgroups: Vec::new(),
    };
    let finder = NetnsFinder::new("/proc", vec![]).expect("finder");
    let mut times = Vec::new();
    let mut ip_stats = None;
    for _ in 0..5 {
        let t = Instant::now();
        let (found, stats) = finder.find_with_stats(&query).expect("find");
        times.push(t.elapsed());
        check(&found);
        assert_eq!(stats.by_process_ip, PODS);
        ip_stats = Some(stats);
    }
    let by_proc_ip = median(times);
    for (i, uid) in uids.iter().enumerate() {
        let cg = PodCgroup::new(uid, i % 2 == 0);
        cg.enter(procs.children.0[i].id());
        procs.cgroups.push(cg);
    }
    let mut times = Vec::new();
    let mut cg_stats = None;
    for _ in 0..5 {
        let t = Instant::now();
        let (found, stats) = finder.find_with_stats(&query).expect("find");
        times.push(t.elapsed());
        check(&found);
        assert_eq!(stats.by_cgroup, PODS, "{stats:?}");
        assert_eq!(stats.netns_entered, PODS, "{stats:?}");
        cg_stats = Some(stats);
    }
    let by_real_cgroup = median(times);
    // Baseline: the same work as one `find` per pod (a /proc walk each), once.
    let t = Instant::now();
    for q in &query {
        let found = finder.find(std::slice::from_ref(q)).expect("find one");
        assert_eq!(found.len(), 1);
    }
    let per_pod_calls = t.elapsed();
    drop(procs);

    println!(
        "podns bench: {PODS} pods in {PODS} netns (setup {setup:?}), median of 5 `find` calls:\n\
         - by cgroup, fake proc root ({} processes, 2 per pod + 300 host): {by_cgroup:?}\n\
         - by netns-dir file: {by_dir:?}\n\
         - by process IP, real /proc: {by_proc_ip:?} ({ip_stats:?})\n\
         - by cgroup, real /proc: {by_real_cgroup:?} ({cg_stats:?})\n\
         - baseline, by cgroup, real /proc, one `find` per pod ({PODS} walks): {per_pod_calls:?}",
        2 * PODS + 300
    );
}
