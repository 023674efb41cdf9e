//! Ambient node-level redirection (`iptables` redirect mode, spec §3): pure generation of
//! everything the mode installs — node netns chains (mangle/nat/filter `ztunnel-*`), ztunnel
//! netns TPROXY rules, policy-routing rules, routes, sysctls — as data and as
//! `iptables-restore --noflush` text. Nothing here touches the system.
//!
//! Rules are rendered in the canonical spelling `iptables-save` (1.8.x, legacy and nft) prints
//! them back in (`--set-xmark`, `/32` suffixes, `-s/-d/-i/-p` first), so that a reconcile can
//! compare the saved chains with the desired ones line by line and do nothing when they match.
//!
//! Deliberate differences from the reference (each one is documented at its use):
//! * **hairpin** ([`NodeConfig::hairpin`], on by default): same-node captured→captured HBONE
//!   (ztunnel → `podIP:15008`) is sent back into ztunnel's inbound path instead of to the pod
//!   (the reference fails this case, ztunnel contract item 6);
//! * the ztunnel netns rules live in user chains `ztunnel-PREROUTING`/`ztunnel-OUTPUT`
//!   jumped to from the built-ins, instead of flushing ztunnel's `mangle PREROUTING` and
//!   `nat OUTPUT`;
//! * fixed tunnel MAC addresses ([`MAC_TUN_IN_ZTUNNEL`] …) and no VXLAN learning, so a
//!   ztunnel restart does not leave the node with a stale neighbour entry;
//! * ztunnel netns: `pistioin accept_local=1` (needed by the hairpin when ztunnel's HBONE source
//!   is its own IP);
//! * the unused `ztunnel-POSTROUTING` chains are created (as the reference does) but every
//!   chain, jump, route, rule and sysctl is also removable ([`removal_text`]).

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Outbound mark: TCP from an enrolled pod → rule 101 → table 101 → `istioout`.
pub const MARK_OUTBOUND: u32 = 0x100;
/// Skip mark: main table (rule 100 `goto 32766`).
pub const MARK_SKIP: u32 = 0x200;
/// ztunnel-originated with its own source (skip + connmark).
pub const MARK_CONN_SKIP: u32 = 0x220;
/// ztunnel-originated with a spoofed source (skip + connmark).
pub const MARK_PROXY: u32 = 0x210;
/// Return traffic to a spoofed source → rule 102 → table 102 → ztunnel veth.
pub const MARK_PROXY_RET: u32 = 0x040;
/// TPROXY mark in the ztunnel netns (rule 20000).
pub const MARK_TPROXY: u32 = 0x400;
/// Original-source return mark in the ztunnel netns (rule 20003).
pub const MARK_ORG_SRC_RET: u32 = 0x4d3;
/// Mask of both ztunnel-netns marks.
pub const MASK_ZTUNNEL: u32 = 0xfff;
/// Connmark tagging ztunnel-originated HBONE connections in the ztunnel netns (hairpin;
/// not in the reference).
pub const CONNMARK_HAIRPIN: u32 = 0x4d4;
/// Every mark bit the node netns rules set or test (conflict detection).
pub const NODE_MARK_BITS: u32 =
    MARK_OUTBOUND | MARK_SKIP | MARK_CONN_SKIP | MARK_PROXY | MARK_PROXY_RET;

/// Route tables.
pub const TABLE_INBOUND: u32 = 100;
pub const TABLE_OUTBOUND: u32 = 101;
pub const TABLE_PROXY: u32 = 102;
/// Node ip rule priorities 100..=103.
pub const NODE_RULE_PRIORITIES: [u32; 4] = [100, 101, 102, 103];
/// ztunnel netns rule priorities.
pub const ZTUNNEL_RULE_PRIORITIES: [u32; 2] = [20000, 20003];
/// The priority of the kernel's `main` rule (target of the skip `goto`).
pub const MAIN_RULE_PRIORITY: u32 = 32766;

/// Tunnel names and addresses.
pub const TUN_IN: &str = "istioin";
pub const TUN_OUT: &str = "istioout";
pub const ZTUN_IN: &str = "pistioin";
pub const ZTUN_OUT: &str = "pistioout";
pub const VNI_IN: u32 = 1000;
pub const VNI_OUT: u32 = 1001;
pub const TUN_IN_HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 126, 1);
pub const TUN_IN_ZTUNNEL: Ipv4Addr = Ipv4Addr::new(192, 168, 126, 2);
pub const TUN_OUT_HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 1);
pub const TUN_OUT_ZTUNNEL: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 2);
pub const TUN_PREFIX: u8 = 30;
/// Fixed (locally administered) tunnel MACs — not in the reference, which lets the kernel
/// pick random ones: a restarted ztunnel's new `pistioin` then has a new MAC and the node's
/// neighbour entry for 192.168.126.2 points at the old one until it expires (~30 s of
/// dropped inbound traffic). With fixed MACs the switch is immediate.
pub const MAC_TUN_IN_HOST: [u8; 6] = [0x02, 0x6d, 0x63, 0x6e, 0x01, 0x01];
pub const MAC_TUN_OUT_HOST: [u8; 6] = [0x02, 0x6d, 0x63, 0x6e, 0x02, 0x01];
pub const MAC_TUN_IN_ZTUNNEL: [u8; 6] = [0x02, 0x6d, 0x63, 0x6e, 0x01, 0x02];
pub const MAC_TUN_OUT_ZTUNNEL: [u8; 6] = [0x02, 0x6d, 0x63, 0x6e, 0x02, 0x02];

/// ztunnel ports.
pub const PORT_OUTBOUND: u16 = 15001;
pub const PORT_INBOUND: u16 = 15006;
pub const PORT_HBONE: u16 = 15008;
pub const PORT_DNS: u16 = 15053;

/// The ipset of enrolled pod IPs (`hash:ip comment`, comment = pod UID).
pub const IPSET_NAME: &str = "ztunnel-pods-ips";

/// An iptables table this mode writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum XTable {
    Filter,
    Mangle,
    Nat,
}

impl XTable {
    pub fn name(self) -> &'static str {
        match self {
            XTable::Filter => "filter",
            XTable::Mangle => "mangle",
            XTable::Nat => "nat",
        }
    }
}

/// One user chain with its rules (canonical `iptables-save` spelling, without `-A <chain>`)
/// and the built-in chain that jumps to it (`-I <hook> -j <chain>`, first position).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRules {
    pub table: XTable,
    pub chain: &'static str,
    pub hook: &'static str,
    pub rules: Vec<String>,
}

/// Inputs of the node netns rules (spec §3.3 `CreateRulesOnNode`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// ztunnel's host-side veth (`ZV`).
    pub ztunnel_veth: String,
    /// ztunnel pod IP (`ZIP`).
    pub ztunnel_ip: Ipv4Addr,
    /// Host IP (`HIP`): source of kubelet probes; `src` of the per-pod inbound routes.
    pub host_ip: Ipv4Addr,
    /// UDP destination port of the tunnels (`GP`).
    pub tunnel_port: u16,
    /// DNAT pod DNS (udp/53) to ztunnel:15053 (ztunnel env `ISTIO_META_DNS_CAPTURE=true`).
    pub dns_capture: bool,
    /// Hairpin same-node captured→captured HBONE (see module docs). Off = reference behaviour.
    pub hairpin: bool,
}

/// The user chains and their hooks, in creation order (spec §3.3 `initializeLists`).
pub const NODE_CHAINS: [(XTable, &str, &str); 8] = [
    (XTable::Nat, "ztunnel-PREROUTING", "PREROUTING"),
    (XTable::Nat, "ztunnel-POSTROUTING", "POSTROUTING"),
    (XTable::Mangle, "ztunnel-PREROUTING", "PREROUTING"),
    (XTable::Mangle, "ztunnel-POSTROUTING", "POSTROUTING"),
    (XTable::Mangle, "ztunnel-OUTPUT", "OUTPUT"),
    (XTable::Mangle, "ztunnel-INPUT", "INPUT"),
    (XTable::Mangle, "ztunnel-FORWARD", "FORWARD"),
    (XTable::Filter, "ztunnel-FORWARD", "FORWARD"),
];

/// The ztunnel netns user chains (a deliberate difference: the reference flushes the
/// built-ins instead).
pub const ZTUNNEL_CHAINS: [(XTable, &str, &str); 2] = [
    (XTable::Mangle, "ztunnel-PREROUTING", "PREROUTING"),
    (XTable::Mangle, "ztunnel-OUTPUT", "OUTPUT"),
];

fn mark(value: u32, mask: u32) -> String {
    format!("{value:#x}/{mask:#x}")
}

/// `-m mark --mark V/V`.
fn has_mark(v: u32) -> String {
    format!("-m mark --mark {}", mark(v, v))
}

/// `-j MARK --set-xmark V/M`.
fn set_mark(v: u32, m: u32) -> String {
    format!("-j MARK --set-xmark {}", mark(v, m))
}

/// The node netns chains with their rules, in the reference's order (batch 1 then batch 2
/// of spec §3.3, 1.20 spelling), plus the hairpin rule when enabled.
pub fn node_chains(cfg: &NodeConfig) -> Vec<ChainRules> {
    let zv = &cfg.ztunnel_veth;
    let zip = cfg.ztunnel_ip;
    let hip = cfg.host_ip;
    let mut mangle_pre: Vec<String> = Vec::new();
    let mut mangle_fwd = Vec::new();
    let mut mangle_in = Vec::new();
    let mut mangle_out = Vec::new();
    let mut nat_pre = Vec::new();
    let mut nat_post = Vec::new();
    let mut filter_fwd = Vec::new();

    // batch 1
    for tun in [TUN_IN, TUN_OUT] {
        mangle_pre.push(format!("-i {tun} {}", set_mark(MARK_SKIP, MARK_SKIP)));
        mangle_pre.push(format!("-i {tun} -j RETURN"));
    }
    for m in [MARK_CONN_SKIP, MARK_PROXY] {
        let rule = format!(
            "{} -j CONNMARK --save-mark --nfmask {m:#x} --ctmask {m:#x}",
            has_mark(m)
        );
        mangle_fwd.push(rule.clone());
        mangle_in.push(rule);
    }
    mangle_out.push(format!(
        "-s {hip}/32 -p tcp -m owner --socket-exists -m set --match-set {IPSET_NAME} dst {}",
        set_mark(MARK_CONN_SKIP, u32::MAX)
    ));
    nat_pre.push(format!("{} -j ACCEPT", has_mark(MARK_OUTBOUND)));
    nat_post.push(format!("{} -j ACCEPT", has_mark(MARK_OUTBOUND)));
    filter_fwd.push(format!("{} -j ACCEPT", has_mark(MARK_OUTBOUND)));
    if cfg.dns_capture {
        nat_pre.push(format!(
            "-p udp -m set --match-set {IPSET_NAME} src -m udp --dport 53 -j DNAT --to-destination {zip}:{PORT_DNS}"
        ));
    }
    // batch 2
    mangle_pre.push(format!(
        "-p udp -m udp --dport {} -j RETURN",
        cfg.tunnel_port
    ));
    if cfg.hairpin {
        // Hairpin (not in the reference): ztunnel's own HBONE to a pod enrolled on this node
        // leaves its veth with dst podIP:15008. Without a mark it is not skipped, so ip rule
        // 103 sends it through table 100 (`podIP via 192.168.126.2 dev istioin`) back into
        // ztunnel's netns, where `-i pistioin --dport 15008` TPROXYs it to the inbound HBONE
        // listener — instead of the main table delivering it to the pod, which has no 15008.
        // It must precede the connmark/ztunnel-veth rules below, which would mark it "skip".
        mangle_pre.push(format!(
            "-i {zv} -p tcp -m set --match-set {IPSET_NAME} dst -m tcp --dport {PORT_HBONE} -j RETURN"
        ));
    }
    mangle_pre.push(format!(
        "-m connmark --mark {} {}",
        mark(MARK_CONN_SKIP, MARK_CONN_SKIP),
        set_mark(MARK_SKIP, MARK_SKIP)
    ));
    mangle_pre.push(format!("{} -j RETURN", has_mark(MARK_SKIP)));
    mangle_pre.push(format!(
        "! -i {zv} -m connmark --mark {} {}",
        mark(MARK_PROXY, MARK_PROXY),
        set_mark(MARK_PROXY_RET, MARK_PROXY_RET)
    ));
    mangle_pre.push(format!("{} -j RETURN", has_mark(MARK_PROXY_RET)));
    mangle_pre.push(format!(
        "! -s {zip}/32 -i {zv} {}",
        set_mark(MARK_PROXY, MARK_PROXY)
    ));
    mangle_pre.push(format!("{} -j RETURN", has_mark(MARK_SKIP)));
    mangle_pre.push(format!(
        "-i {zv} {}",
        set_mark(MARK_CONN_SKIP, MARK_CONN_SKIP)
    ));
    mangle_pre.push(format!(
        "-p udp {}",
        set_mark(MARK_CONN_SKIP, MARK_CONN_SKIP)
    ));
    // Not in the reference: only *new* connections are captured. A connection that was open
    // before its pod was enrolled has no ztunnel socket; redirecting its next segment (to
    // 15001 outbound, or via table 100 to 15006 inbound) would make ztunnel's listener answer
    // with a RST. Connections that already go through ztunnel never get here: they carry
    // connmark 0x210 from ztunnel's first reply and are steered by the 0x040 rule above.
    mangle_pre.push(format!(
        "-p tcp -m conntrack ! --ctstate NEW {}",
        set_mark(MARK_SKIP, MARK_SKIP)
    ));
    mangle_pre.push(format!("{} -j RETURN", has_mark(MARK_SKIP)));
    mangle_pre.push(format!(
        "-p tcp -m set --match-set {IPSET_NAME} src {}",
        set_mark(MARK_OUTBOUND, MARK_OUTBOUND)
    ));

    NODE_CHAINS
        .iter()
        .map(|&(table, chain, hook)| {
            let rules = match (table, chain) {
                (XTable::Nat, "ztunnel-PREROUTING") => nat_pre.clone(),
                (XTable::Nat, "ztunnel-POSTROUTING") => nat_post.clone(),
                (XTable::Mangle, "ztunnel-PREROUTING") => mangle_pre.clone(),
                (XTable::Mangle, "ztunnel-OUTPUT") => mangle_out.clone(),
                (XTable::Mangle, "ztunnel-INPUT") => mangle_in.clone(),
                (XTable::Mangle, "ztunnel-FORWARD") => mangle_fwd.clone(),
                (XTable::Filter, "ztunnel-FORWARD") => filter_fwd.clone(),
                _ => Vec::new(),
            };
            ChainRules {
                table,
                chain,
                hook,
                rules,
            }
        })
        .collect()
}

/// Inputs of the ztunnel netns rules (spec §3.5 `CreateRulesWithinNodeProxyNS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZtunnelConfig {
    pub ztunnel_ip: Ipv4Addr,
    /// The node address ztunnel's netns reaches the node at (`HOSTIP_BY_ROUTE`).
    pub host_ip_by_route: Ipv4Addr,
    /// ztunnel's own end of its veth (`eth0`).
    pub eth: String,
    pub hairpin: bool,
}

/// The ztunnel netns chains (TPROXY to 15008/15001/15006 and the original-source return mark).
pub fn ztunnel_chains(cfg: &ZtunnelConfig) -> Vec<ChainRules> {
    let tproxy = |port: u16| {
        format!(
            "-j TPROXY --on-port {port} --on-ip 127.0.0.1 --tproxy-mark {}",
            mark(MARK_TPROXY, MASK_ZTUNNEL)
        )
    };
    let pre = vec![
        format!(
            "-i {ZTUN_IN} -p tcp -m tcp --dport {PORT_HBONE} {}",
            tproxy(PORT_HBONE)
        ),
        format!("-i {ZTUN_OUT} -p tcp {}", tproxy(PORT_OUTBOUND)),
        format!("-i {ZTUN_IN} -p tcp {}", tproxy(PORT_INBOUND)),
        format!(
            "! -d {}/32 -i {} -p tcp {}",
            cfg.ztunnel_ip,
            cfg.eth,
            set_mark(MARK_ORG_SRC_RET, MASK_ZTUNNEL)
        ),
    ];
    let mut out = Vec::new();
    if cfg.hairpin {
        // Hairpin, ztunnel side: a connection ztunnel opens to *:15008 is tagged; if the node
        // hairpins it back (same-node destination), ztunnel's inbound listener answers it
        // locally, and those answers (the only locally generated REPLY-direction packets such
        // a connection can have) get the original-source return mark → rule 20003 → table
        // 100 `local default dev lo` → delivered to ztunnel's own client socket, whatever
        // (possibly spoofed) source it bound.
        out.push(format!(
            "-p tcp -m connmark --mark {} -m conntrack --ctdir REPLY {}",
            mark(CONNMARK_HAIRPIN, MASK_ZTUNNEL),
            set_mark(MARK_ORG_SRC_RET, MASK_ZTUNNEL)
        ));
        out.push(format!(
            "-p tcp -m tcp --dport {PORT_HBONE} -m conntrack --ctdir ORIGINAL -j CONNMARK --set-xmark {}",
            mark(CONNMARK_HAIRPIN, MASK_ZTUNNEL)
        ));
    }
    ZTUNNEL_CHAINS
        .iter()
        .map(|&(table, chain, hook)| ChainRules {
            table,
            chain,
            hook,
            rules: if hook == "PREROUTING" {
                pre.clone()
            } else {
                out.clone()
            },
        })
        .collect()
}

/// `-save` output → the rules of `table`/`chain`, each without its `-A <chain> ` prefix.
pub fn saved_chain_rules(save: &str, table: XTable, chain: &str) -> Vec<String> {
    let prefix = format!("-A {chain} ");
    table_lines(save, table)
        .filter_map(|l| l.strip_prefix(&prefix).map(str::to_string))
        .collect()
}

fn table_lines(save: &str, table: XTable) -> impl Iterator<Item = &str> {
    let header = format!("*{}", table.name());
    save.lines()
        .skip_while(move |l| l.trim() != header)
        .skip(1)
        .take_while(|l| l.trim() != "COMMIT")
}

/// Whether `-save` output declares the user chain.
pub fn chain_exists(save: &str, table: XTable, chain: &str) -> bool {
    let decl = format!(":{chain} ");
    table_lines(save, table).any(|l| l.starts_with(&decl))
}

/// How many `-A <hook> -j <chain>` jumps the saved table holds.
pub fn jump_count(save: &str, table: XTable, hook: &str, chain: &str) -> usize {
    let line = format!("-A {hook} -j {chain}");
    table_lines(save, table)
        .filter(|l| l.trim() == line)
        .count()
}

/// Whether the saved state is exactly `chains` (every chain present with exactly its rules,
/// exactly one jump from its hook).
pub fn is_installed(save: &str, chains: &[ChainRules]) -> bool {
    chains.iter().all(|c| {
        chain_exists(save, c.table, c.chain)
            && saved_chain_rules(save, c.table, c.chain) == c.rules
            && jump_count(save, c.table, c.hook, c.chain) == 1
    })
}

/// `iptables-restore --noflush` text installing `chains` over `save` (the current state):
/// declaring a chain flushes it, so rules are replaced, never duplicated; jumps are added only
/// where missing (and surplus duplicates removed). `None` when the state already matches —
/// a reconcile then runs no iptables command at all.
pub fn restore_text(chains: &[ChainRules], save: &str) -> Option<String> {
    if is_installed(save, chains) {
        return None;
    }
    let mut tables: Vec<XTable> = chains.iter().map(|c| c.table).collect();
    tables.sort();
    tables.dedup();
    let mut out = String::new();
    for table in tables {
        let _ = writeln!(out, "*{}", table.name());
        let of_table: Vec<&ChainRules> = chains.iter().filter(|c| c.table == table).collect();
        for c in &of_table {
            let _ = writeln!(out, ":{} - [0:0]", c.chain);
        }
        for c in &of_table {
            let jumps = jump_count(save, table, c.hook, c.chain);
            if jumps == 0 {
                let _ = writeln!(out, "-I {} -j {}", c.hook, c.chain);
            }
            for _ in 1..jumps.max(1) {
                let _ = writeln!(out, "-D {} -j {}", c.hook, c.chain);
            }
            for r in &c.rules {
                let _ = writeln!(out, "-A {} {r}", c.chain);
            }
        }
        out.push_str("COMMIT\n");
    }
    Some(out)
}

/// `iptables-restore --noflush` text removing every chain of `chains` (and every jump to it)
/// present in `save`; `None` when nothing is there.
pub fn removal_text(chains: &[(XTable, &str, &str)], save: &str) -> Option<String> {
    let mut tables: Vec<XTable> = chains.iter().map(|c| c.0).collect();
    tables.sort();
    tables.dedup();
    let mut out = String::new();
    for table in tables {
        let mut body = String::new();
        let present: Vec<_> = chains
            .iter()
            .filter(|c| c.0 == table && chain_exists(save, table, c.1))
            .collect();
        for (_, chain, _) in &present {
            let _ = writeln!(body, ":{chain} - [0:0]");
        }
        for (_, chain, hook) in chains.iter().filter(|c| c.0 == table) {
            for _ in 0..jump_count(save, table, hook, chain) {
                let _ = writeln!(body, "-D {hook} -j {chain}");
            }
        }
        for (_, chain, _) in &present {
            let _ = writeln!(body, "-X {chain}");
        }
        if !body.is_empty() {
            let _ = writeln!(out, "*{}", table.name());
            out.push_str(&body);
            out.push_str("COMMIT\n");
        }
    }
    (!out.is_empty()).then_some(out)
}

/// A rule in a chain we do not own that sets or tests one of our node mark bits, found in
/// `-save` output (conflict detection: another agent uses our marks).
pub fn foreign_mark_users(save: &str, our_chains: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    let mut table = "";
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim();
            continue;
        }
        let Some(rest) = line.strip_prefix("-A ") else {
            continue;
        };
        let chain = rest.split_whitespace().next().unwrap_or_default();
        if our_chains.contains(&chain) || rest.split_whitespace().any(|t| our_chains.contains(&t)) {
            continue;
        }
        let toks: Vec<&str> = rest.split_whitespace().collect();
        let overlaps = toks.windows(2).any(|w| {
            matches!(
                w[0],
                "--mark" | "--set-xmark" | "--set-mark" | "--and-mark" | "--or-mark"
            ) && mask_of(w[1]).is_some_and(|m| m & NODE_MARK_BITS != 0)
        });
        if overlaps {
            found.push(format!("{table}: {line}"));
        }
    }
    found
}

/// The effective bit set of a `V[/M]` mark argument (`M` when given, else `V`).
fn mask_of(arg: &str) -> Option<u32> {
    let parse = |s: &str| {
        s.strip_prefix("0x")
            .map_or_else(|| s.parse().ok(), |h| u32::from_str_radix(h, 16).ok())
    };
    match arg.split_once('/') {
        Some((_, m)) => parse(m),
        None => parse(arg),
    }
}

/// What a policy-routing rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpRuleAction {
    Lookup(u32),
    Goto(u32),
}

/// `ip rule add priority P [fwmark M/MASK] (lookup T | goto G)` (IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRule {
    pub priority: u32,
    pub fwmark: Option<(u32, u32)>,
    pub action: IpRuleAction,
}

/// The node rules (spec §3.3).
pub fn node_ip_rules() -> Vec<IpRule> {
    vec![
        IpRule {
            priority: 100,
            fwmark: Some((MARK_SKIP, MARK_SKIP)),
            action: IpRuleAction::Goto(MAIN_RULE_PRIORITY),
        },
        IpRule {
            priority: 101,
            fwmark: Some((MARK_OUTBOUND, MARK_OUTBOUND)),
            action: IpRuleAction::Lookup(TABLE_OUTBOUND),
        },
        IpRule {
            priority: 102,
            fwmark: Some((MARK_PROXY_RET, MARK_PROXY_RET)),
            action: IpRuleAction::Lookup(TABLE_PROXY),
        },
        IpRule {
            priority: 103,
            fwmark: None,
            action: IpRuleAction::Lookup(TABLE_INBOUND),
        },
    ]
}

/// The ztunnel netns rules (spec §3.5).
pub fn ztunnel_ip_rules() -> Vec<IpRule> {
    vec![
        IpRule {
            priority: 20000,
            fwmark: Some((MARK_TPROXY, MASK_ZTUNNEL)),
            action: IpRuleAction::Lookup(TABLE_INBOUND),
        },
        IpRule {
            priority: 20003,
            fwmark: Some((MARK_ORG_SRC_RET, MASK_ZTUNNEL)),
            action: IpRuleAction::Lookup(TABLE_INBOUND),
        },
    ]
}

/// One IPv4 route in a table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub table: u32,
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    /// Output device (`lo` for local routes).
    pub dev: String,
    pub src: Option<Ipv4Addr>,
    pub onlink: bool,
    /// `scope link` (directly connected).
    pub scope_link: bool,
    /// `local` route type.
    pub local: bool,
}

impl Route {
    fn new(table: u32, dst: Ipv4Net, dev: &str) -> Route {
        Route {
            table,
            dst,
            gateway: None,
            dev: dev.to_string(),
            src: None,
            onlink: false,
            scope_link: false,
            local: false,
        }
    }
}

fn host(ip: Ipv4Addr) -> Ipv4Net {
    Ipv4Net::from(ip)
}

fn default_net() -> Ipv4Net {
    Ipv4Net::default()
}

/// The node routes (spec §3.3), in the reference's order.
pub fn node_routes(cfg: &NodeConfig) -> Vec<Route> {
    let zv = cfg.ztunnel_veth.as_str();
    let zip = cfg.ztunnel_ip;
    let link = |table| Route {
        scope_link: true,
        ..Route::new(table, host(zip), zv)
    };
    vec![
        link(TABLE_OUTBOUND),
        Route {
            gateway: Some(TUN_OUT_ZTUNNEL),
            ..Route::new(TABLE_OUTBOUND, default_net(), TUN_OUT)
        },
        link(TABLE_PROXY),
        Route {
            gateway: Some(zip),
            onlink: true,
            ..Route::new(TABLE_PROXY, default_net(), zv)
        },
        link(TABLE_INBOUND),
    ]
}

/// The per-pod inbound route (spec §3.4): `table 100 IP/32 via 192.168.126.2 dev istioin src HIP`.
pub fn pod_route(ip: Ipv4Addr, host_ip: Ipv4Addr) -> Route {
    Route {
        gateway: Some(TUN_IN_ZTUNNEL),
        src: Some(host_ip),
        ..Route::new(TABLE_INBOUND, host(ip), TUN_IN)
    }
}

/// The ztunnel netns routes (spec §3.5).
pub fn ztunnel_routes(cfg: &ZtunnelConfig) -> Vec<Route> {
    let hip = cfg.host_ip_by_route;
    vec![
        Route {
            local: true,
            ..Route::new(TABLE_INBOUND, default_net(), "lo")
        },
        Route {
            gateway: Some(TUN_OUT_HOST),
            ..Route::new(TABLE_OUTBOUND, default_net(), ZTUN_OUT)
        },
        Route {
            gateway: Some(TUN_IN_HOST),
            ..Route::new(TABLE_PROXY, default_net(), ZTUN_IN)
        },
        Route {
            scope_link: true,
            ..Route::new(TABLE_OUTBOUND, host(hip), &cfg.eth)
        },
        Route {
            scope_link: true,
            ..Route::new(TABLE_PROXY, host(hip), &cfg.eth)
        },
    ]
}

/// A sysctl under `/proc/sys/net/ipv4/conf/<iface>/<key>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sysctl {
    pub iface: String,
    pub key: &'static str,
    pub value: &'static str,
}

impl Sysctl {
    fn new(iface: &str, key: &'static str, value: &'static str) -> Sysctl {
        Sysctl {
            iface: iface.to_string(),
            key,
            value,
        }
    }

    /// `net/ipv4/conf/<iface>/<key>`.
    pub fn path(&self) -> String {
        format!("net/ipv4/conf/{}/{}", self.iface, self.key)
    }
}

/// Node sysctls that outlive the tunnels (spec §3.3): rp_filter off on default/all/ZV and
/// accept_local on ZV. (The tunnels' own sysctls are in [`tunnel_sysctls`].)
pub fn node_sysctls(ztunnel_veth: &str) -> Vec<Sysctl> {
    vec![
        Sysctl::new("default", "rp_filter", "0"),
        Sysctl::new("all", "rp_filter", "0"),
        Sysctl::new(ztunnel_veth, "rp_filter", "0"),
        Sysctl::new(ztunnel_veth, "accept_local", "1"),
    ]
}

/// Sysctls of the node-side tunnel devices (they vanish with the devices).
pub fn tunnel_sysctls() -> Vec<Sysctl> {
    [TUN_IN, TUN_OUT]
        .iter()
        .flat_map(|t| {
            [
                Sysctl::new(t, "rp_filter", "0"),
                Sysctl::new(t, "accept_local", "1"),
            ]
        })
        .collect()
}

/// Per-pod sysctl (spec §3.4 step 3; default/all are already in [`node_sysctls`]).
pub fn pod_sysctls(pod_veth: &str) -> Vec<Sysctl> {
    vec![Sysctl::new(pod_veth, "rp_filter", "0")]
}

/// ztunnel netns sysctls (spec §3.5, plus `pistioin accept_local=1` for the hairpin).
pub fn ztunnel_sysctls(eth: &str, hairpin: bool) -> Vec<Sysctl> {
    let mut v = vec![
        Sysctl::new(ZTUN_OUT, "rp_filter", "0"),
        Sysctl::new(ZTUN_IN, "rp_filter", "0"),
        Sysctl::new("default", "rp_filter", "0"),
        Sysctl::new("all", "rp_filter", "0"),
        Sysctl::new(eth, "rp_filter", "0"),
    ];
    if hairpin {
        v.push(Sysctl::new(ZTUN_IN, "accept_local", "1"));
    }
    v
}

/// The node iptables work as the reference executes it — one `iptables` invocation per chain
/// creation, jump and rule (spec §3.3 / §3.7), as argument vectors without the binary. Used by
/// the exec-per-rule baseline of the enrollment benchmark.
pub fn reference_iptables_commands(cfg: &NodeConfig) -> Vec<Vec<String>> {
    let mut cmds = Vec::new();
    let chains = node_chains(cfg);
    for c in &chains {
        cmds.push(vec![
            "-t".into(),
            c.table.name().into(),
            "-N".into(),
            c.chain.into(),
        ]);
        cmds.push(vec![
            "-t".into(),
            c.table.name().into(),
            "-I".into(),
            c.hook.into(),
            "-j".into(),
            c.chain.into(),
        ]);
    }
    for c in &chains {
        for r in &c.rules {
            let mut v: Vec<String> = vec![
                "-t".into(),
                c.table.name().into(),
                "-A".into(),
                c.chain.into(),
            ];
            v.extend(r.split_whitespace().map(str::to_string));
            cmds.push(v);
        }
    }
    cmds
}

/// `ip route` spelling of a route (logs, the exec baseline, golden tests).
pub fn route_args(r: &Route) -> Vec<String> {
    let mut v = vec!["table".to_string(), r.table.to_string()];
    if r.local {
        v.push("local".into());
    }
    v.push(r.dst.to_string());
    if let Some(g) = r.gateway {
        v.extend(["via".into(), g.to_string()]);
    }
    v.extend(["dev".into(), r.dev.clone()]);
    if let Some(s) = r.src {
        v.extend(["src".into(), s.to_string()]);
    }
    if r.scope_link {
        v.extend(["scope".into(), "link".into()]);
    }
    if r.onlink {
        v.push("onlink".into());
    }
    v
}

/// `ip rule` spelling of a rule.
pub fn ip_rule_args(r: &IpRule) -> Vec<String> {
    let mut v = vec!["priority".to_string(), r.priority.to_string()];
    if let Some((m, mask)) = r.fwmark {
        v.extend(["fwmark".into(), mark(m, mask)]);
    }
    match r.action {
        IpRuleAction::Lookup(t) => v.extend(["lookup".into(), t.to_string()]),
        IpRuleAction::Goto(g) => v.extend(["goto".into(), g.to_string()]),
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NodeConfig {
        // spec §3.7 worked example
        NodeConfig {
            ztunnel_veth: "vethZ".into(),
            ztunnel_ip: Ipv4Addr::new(10, 244, 1, 5),
            host_ip: Ipv4Addr::new(10, 244, 1, 1),
            tunnel_port: 6081,
            dns_capture: false,
            hairpin: false,
        }
    }

    /// Spec §3.3 batch 1 + batch 2 (1.20) for the §3.7 example, rewritten in the canonical
    /// `iptables-save` spelling (`--set-mark X` → `--set-xmark X/0xffffffff`, `X/Y` kept,
    /// `0x040` → `0x40`, `--source A` → `-s A/32` printed first, `-m udp` before `--dport`).
    const SPEC_NODE: &str = "\
*filter
:ztunnel-FORWARD - [0:0]
-I FORWARD -j ztunnel-FORWARD
-A ztunnel-FORWARD -m mark --mark 0x100/0x100 -j ACCEPT
COMMIT
*mangle
:ztunnel-PREROUTING - [0:0]
:ztunnel-POSTROUTING - [0:0]
:ztunnel-OUTPUT - [0:0]
:ztunnel-INPUT - [0:0]
:ztunnel-FORWARD - [0:0]
-I PREROUTING -j ztunnel-PREROUTING
-A ztunnel-PREROUTING -i istioin -j MARK --set-xmark 0x200/0x200
-A ztunnel-PREROUTING -i istioin -j RETURN
-A ztunnel-PREROUTING -i istioout -j MARK --set-xmark 0x200/0x200
-A ztunnel-PREROUTING -i istioout -j RETURN
-A ztunnel-PREROUTING -p udp -m udp --dport 6081 -j RETURN
-A ztunnel-PREROUTING -m connmark --mark 0x220/0x220 -j MARK --set-xmark 0x200/0x200
-A ztunnel-PREROUTING -m mark --mark 0x200/0x200 -j RETURN
-A ztunnel-PREROUTING ! -i vethZ -m connmark --mark 0x210/0x210 -j MARK --set-xmark 0x40/0x40
-A ztunnel-PREROUTING -m mark --mark 0x40/0x40 -j RETURN
-A ztunnel-PREROUTING ! -s 10.244.1.5/32 -i vethZ -j MARK --set-xmark 0x210/0x210
-A ztunnel-PREROUTING -m mark --mark 0x200/0x200 -j RETURN
-A ztunnel-PREROUTING -i vethZ -j MARK --set-xmark 0x220/0x220
-A ztunnel-PREROUTING -p udp -j MARK --set-xmark 0x220/0x220
-A ztunnel-PREROUTING -p tcp -m conntrack ! --ctstate NEW -j MARK --set-xmark 0x200/0x200
-A ztunnel-PREROUTING -m mark --mark 0x200/0x200 -j RETURN
-A ztunnel-PREROUTING -p tcp -m set --match-set ztunnel-pods-ips src -j MARK --set-xmark 0x100/0x100
-I POSTROUTING -j ztunnel-POSTROUTING
-I OUTPUT -j ztunnel-OUTPUT
-A ztunnel-OUTPUT -s 10.244.1.1/32 -p tcp -m owner --socket-exists -m set --match-set ztunnel-pods-ips dst -j MARK --set-xmark 0x220/0xffffffff
-I INPUT -j ztunnel-INPUT
-A ztunnel-INPUT -m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220
-A ztunnel-INPUT -m mark --mark 0x210/0x210 -j CONNMARK --save-mark --nfmask 0x210 --ctmask 0x210
-I FORWARD -j ztunnel-FORWARD
-A ztunnel-FORWARD -m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220
-A ztunnel-FORWARD -m mark --mark 0x210/0x210 -j CONNMARK --save-mark --nfmask 0x210 --ctmask 0x210
COMMIT
*nat
:ztunnel-PREROUTING - [0:0]
:ztunnel-POSTROUTING - [0:0]
-I PREROUTING -j ztunnel-PREROUTING
-A ztunnel-PREROUTING -m mark --mark 0x100/0x100 -j ACCEPT
-I POSTROUTING -j ztunnel-POSTROUTING
-A ztunnel-POSTROUTING -m mark --mark 0x100/0x100 -j ACCEPT
COMMIT
";

    #[test]
    fn node_rules_match_the_reference_example() {
        let text = restore_text(&node_chains(&cfg()), "").expect("fresh node needs rules");
        assert_eq!(text, SPEC_NODE);
    }

    #[test]
    fn dns_capture_and_hairpin_add_one_rule_each() {
        let mut c = cfg();
        c.dns_capture = true;
        c.hairpin = true;
        let chains = node_chains(&c);
        let nat_pre = &chains[0].rules;
        assert_eq!(
            nat_pre[1],
            "-p udp -m set --match-set ztunnel-pods-ips src -m udp --dport 53 -j DNAT --to-destination 10.244.1.5:15053"
        );
        let mangle_pre = &chains[2].rules;
        let hp = mangle_pre
            .iter()
            .position(|r| r.contains("--dport 15008"))
            .expect("hairpin rule");
        let first_skip = mangle_pre
            .iter()
            .position(|r| r.contains("-m connmark --mark 0x220/0x220"))
            .expect("connmark rule");
        assert!(
            hp < first_skip,
            "hairpin must precede the ztunnel-veth skip marks"
        );
        let total: usize = chains.iter().map(|c| c.rules.len()).sum();
        assert_eq!(total, 24 + 2);
    }

    #[test]
    fn reapply_over_identical_state_is_a_no_op_and_jumps_are_never_duplicated() {
        let chains = node_chains(&cfg());
        let text = restore_text(&chains, "").expect("rules");
        // Simulate the -save output of the installed state (declarations + rules, as the
        // kernel prints them: -I becomes -A at the top).
        let mut save = String::new();
        for table in [XTable::Filter, XTable::Mangle, XTable::Nat] {
            save.push_str(&format!("*{}\n", table.name()));
            for c in chains.iter().filter(|c| c.table == table) {
                save.push_str(&format!(":{} - [0:0]\n", c.chain));
            }
            for c in chains.iter().filter(|c| c.table == table) {
                save.push_str(&format!("-A {} -j {}\n", c.hook, c.chain));
                for r in &c.rules {
                    save.push_str(&format!("-A {} {r}\n", c.chain));
                }
            }
            save.push_str("COMMIT\n");
        }
        assert!(is_installed(&save, &chains));
        assert_eq!(restore_text(&chains, &save), None);
        // A changed input (ztunnel moved) rewrites the chains but adds no jump.
        let mut moved = cfg();
        moved.ztunnel_veth = "vethY".into();
        let text2 = restore_text(&node_chains(&moved), &save).expect("changed");
        assert!(!text2.contains("-I "), "{text2}");
        assert!(text2.contains("-i vethY"));
        assert!(text.contains("-I PREROUTING"));
        // Removal deletes jumps and chains.
        let removal = removal_text(&NODE_CHAINS, &save).expect("something to remove");
        assert!(removal.contains("-D PREROUTING -j ztunnel-PREROUTING\n"));
        assert!(removal.contains("-X ztunnel-FORWARD\n"));
        assert_eq!(removal_text(&NODE_CHAINS, ""), None);
    }

    #[test]
    fn ztunnel_rules_match_spec_3_5() {
        let z = ZtunnelConfig {
            ztunnel_ip: Ipv4Addr::new(10, 244, 1, 5),
            host_ip_by_route: Ipv4Addr::new(10, 244, 1, 1),
            eth: "eth0".into(),
            hairpin: false,
        };
        let chains = ztunnel_chains(&z);
        assert_eq!(
            chains[0].rules,
            vec![
                "-i pistioin -p tcp -m tcp --dport 15008 -j TPROXY --on-port 15008 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff",
                "-i pistioout -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff",
                "-i pistioin -p tcp -j TPROXY --on-port 15006 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff",
                "! -d 10.244.1.5/32 -i eth0 -p tcp -j MARK --set-xmark 0x4d3/0xfff",
            ]
        );
        assert!(chains[1].rules.is_empty());
        let routes: Vec<String> = ztunnel_routes(&z)
            .iter()
            .map(|r| route_args(r).join(" "))
            .collect();
        assert_eq!(
            routes,
            vec![
                "table 100 local 0.0.0.0/0 dev lo",
                "table 101 0.0.0.0/0 via 192.168.127.1 dev pistioout",
                "table 102 0.0.0.0/0 via 192.168.126.1 dev pistioin",
                "table 101 10.244.1.1/32 dev eth0 scope link",
                "table 102 10.244.1.1/32 dev eth0 scope link",
            ]
        );
        let rules: Vec<String> = ztunnel_ip_rules()
            .iter()
            .map(|r| ip_rule_args(r).join(" "))
            .collect();
        assert_eq!(
            rules,
            vec![
                "priority 20000 fwmark 0x400/0xfff lookup 100",
                "priority 20003 fwmark 0x4d3/0xfff lookup 100"
            ]
        );
    }

    #[test]
    fn node_routes_rules_and_pod_route_match_spec_3_3_and_3_4() {
        let routes: Vec<String> = node_routes(&cfg())
            .iter()
            .map(|r| route_args(r).join(" "))
            .collect();
        assert_eq!(
            routes,
            vec![
                "table 101 10.244.1.5/32 dev vethZ scope link",
                "table 101 0.0.0.0/0 via 192.168.127.2 dev istioout",
                "table 102 10.244.1.5/32 dev vethZ scope link",
                "table 102 0.0.0.0/0 via 10.244.1.5 dev vethZ onlink",
                "table 100 10.244.1.5/32 dev vethZ scope link",
            ]
        );
        let rules: Vec<String> = node_ip_rules()
            .iter()
            .map(|r| ip_rule_args(r).join(" "))
            .collect();
        assert_eq!(
            rules,
            vec![
                "priority 100 fwmark 0x200/0x200 goto 32766",
                "priority 101 fwmark 0x100/0x100 lookup 101",
                "priority 102 fwmark 0x40/0x40 lookup 102",
                "priority 103 lookup 100",
            ]
        );
        assert_eq!(
            route_args(&pod_route(
                Ipv4Addr::new(10, 244, 1, 10),
                Ipv4Addr::new(10, 244, 1, 1)
            ))
            .join(" "),
            "table 100 10.244.1.10/32 via 192.168.126.2 dev istioin src 10.244.1.1"
        );
        assert_eq!(
            node_sysctls("vethZ")
                .iter()
                .map(Sysctl::path)
                .collect::<Vec<_>>(),
            vec![
                "net/ipv4/conf/default/rp_filter",
                "net/ipv4/conf/all/rp_filter",
                "net/ipv4/conf/vethZ/rp_filter",
                "net/ipv4/conf/vethZ/accept_local",
            ]
        );
    }

    #[test]
    fn foreign_mark_users_are_found_and_ours_ignored() {
        let save = "*mangle\n-A PREROUTING -j ztunnel-PREROUTING\n-A ztunnel-PREROUTING -j MARK --set-xmark 0x200/0x200\n-A CALI-x -j MARK --set-xmark 0x100/0xffffffff\n-A KUBE-MARK -j MARK --set-xmark 0x4000/0x4000\nCOMMIT\n";
        let found = foreign_mark_users(save, &["ztunnel-PREROUTING"]);
        assert_eq!(
            found,
            vec!["mangle: -A CALI-x -j MARK --set-xmark 0x100/0xffffffff".to_string()]
        );
    }

    #[test]
    fn reference_baseline_has_one_command_per_rule_and_chain() {
        let cmds = reference_iptables_commands(&cfg());
        assert_eq!(cmds.len(), 16 + 24);
        assert_eq!(cmds[0], vec!["-t", "nat", "-N", "ztunnel-PREROUTING"]);
    }
}
