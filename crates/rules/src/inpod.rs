//! Ambient redirect mode `inpod` (spec §7.5, §7.6): the rules the node agent writes inside each
//! ambient pod's own netns, and the host-netns health-probe SNAT rule, as the crate's rule model.
//!
//! Both renderers consume the same [`RuleSet`]: [`pod_restore`] / [`host_restore`] give the
//! `iptables-restore --noflush` text per family, [`pod_nft`] / [`host_nft`] the `nft -f`
//! transaction (tables `inet istio-ambient-*`). Byte-identical to Istio's goldens
//! (`testdata/istio/inpod-{iptables,nftables}`, `tests/inpod_golden.rs`).
//!
//! The netlink state that goes with the pod rules ([`pod_routing`]: `ip rule fwmark 0x111/0xfff
//! pref 32764 lookup 100`, `local default dev lo table 100`) is described here and applied by
//! `meshcni-netx`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::iptables;
use crate::model::{
    Chain, Cidr, Family, Match, NftMarkWording, NftSpelling, OwnerKind, Proto, Rule, Scope, Table,
    Target,
};
use crate::nft::{self, NftChain, NftLayout};
pub use crate::sidecar::RuleSet;

/// ztunnel's socket mark (`SO_MARK 1337`), matched under [`INPOD_MASK`].
pub const INPOD_MARK: u32 = 0x539;
/// Mask of the in-pod marks.
pub const INPOD_MASK: u32 = 0xfff;
/// Connmark of connections ztunnel opened (their replies are routed to `lo` via table 100).
pub const INPOD_TPROXY_MARK: u32 = 0x111;
/// `CONNMARK --restore-mark` masks.
pub const RESTORE_MASK: u32 = 0xffff_ffff;
/// Policy-routing table of the in-pod `local` route.
pub const ROUTE_TABLE: u32 = 100;
/// Priority of the in-pod `ip rule`.
pub const RULE_PRIORITY: u32 = 32764;
/// ztunnel's in-pod listeners.
pub const ZTUNNEL_OUTBOUND_PORT: u16 = 15001;
pub const ZTUNNEL_INBOUND_PORT: u16 = 15006;
pub const ZTUNNEL_HBONE_PORT: u16 = 15008;
pub const DNS_CAPTURE_PORT: u16 = 15053;
/// Host probe address sets (ipsets for iptables, sets in `inet istio-ambient-nat` for nft).
pub const PROBE_SET_V4: &str = "istio-inpod-probes-v4";
pub const PROBE_SET_V6: &str = "istio-inpod-probes-v6";
/// Product default SNAT addresses of host probes.
pub const DEFAULT_PROBE_SNAT_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
pub const DEFAULT_PROBE_SNAT_V6: Ipv6Addr = Ipv6Addr::new(
    0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
);

/// Pod annotation: `true` → ingress mode (no inbound capture).
pub const ANNOTATION_BYPASS_INBOUND: &str = "ambient.istio.io/bypass-inbound-capture";
/// Pod annotation: per-pod DNS capture on/off.
pub const ANNOTATION_DNS_CAPTURE: &str = "ambient.istio.io/dns-capture";
/// Pod annotation: comma list of interfaces whose inbound TCP is treated as outbound.
pub const ANNOTATION_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";

/// Custom iptables chains of the pod rules (everything with these names in mangle/nat/raw is ours).
pub const POD_CHAINS: [Chain; 2] = [Chain::IstioPrert, Chain::IstioOutput];
/// Custom iptables chain of the host rule (table nat).
pub const HOST_CHAINS: [Chain; 1] = [Chain::IstioPostrt];

/// Node-wide settings (agent flags / env: `AMBIENT_DNS_CAPTURE`, `AMBIENT_IPV6`,
/// `HOST_PROBE_SNAT_IP`, `HOST_PROBE_SNAT_IPV6`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InpodConfig {
    pub redirect_dns: bool,
    pub enable_ipv6: bool,
    pub host_probe_snat_v4: Ipv4Addr,
    pub host_probe_snat_v6: Ipv6Addr,
}

impl Default for InpodConfig {
    /// Product defaults: DNS capture on, IPv6 on, `169.254.7.127`,
    /// `fd16:9254:7127:1337:ffff:ffff:ffff:ffff`.
    fn default() -> Self {
        InpodConfig {
            redirect_dns: true,
            enable_ipv6: true,
            host_probe_snat_v4: DEFAULT_PROBE_SNAT_V4,
            host_probe_snat_v6: DEFAULT_PROBE_SNAT_V6,
        }
    }
}

/// Per-pod DNS capture override (annotation `ambient.istio.io/dns-capture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DnsOverride {
    /// No annotation: [`InpodConfig::redirect_dns`] decides.
    #[default]
    Unset,
    Enabled,
    Disabled,
}

/// Per-pod settings from annotations.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodOverrides {
    /// No inbound capture (`ambient.istio.io/bypass-inbound-capture: "true"`).
    pub ingress_mode: bool,
    pub dns: DnsOverride,
    /// Interfaces whose inbound TCP goes to ztunnel's outbound port.
    pub virtual_interfaces: Vec<String>,
}

/// Go's `strconv.ParseBool`, which Istio uses for these annotations.
fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!(
            "annotation {key}={value:?}: not a boolean (expected true or false)"
        )),
    }
}

/// Linux interface name rules (`dev_valid_name`: shorter than IFNAMSIZ = 16, not `.`/`..`, no
/// `/`, `:` or whitespace), plus what cannot be written into a rule safely: control characters,
/// `"` (nft quoting) and a leading `!` (iptables negation).
pub fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty interface name".into());
    }
    if name.len() > 15 {
        return Err(format!(
            "interface name {name:?} is {} bytes long; Linux allows at most 15 (IFNAMSIZ 16)",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("interface name {name:?} is not allowed by Linux"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | ':' | '"'))
    {
        return Err(format!(
            "interface name {name:?} contains {c:?} (whitespace, control characters, '/', ':' and '\"' are not allowed)"
        ));
    }
    if name.starts_with('!') {
        return Err(format!(
            "interface name {name:?} starts with '!' (iptables would read a negation)"
        ));
    }
    Ok(())
}

impl PodOverrides {
    /// Read the three in-pod annotations; an invalid value is an error naming the key, the
    /// value and why. Other annotations are ignored.
    pub fn from_annotations(a: &BTreeMap<String, String>) -> Result<PodOverrides, String> {
        let mut pod = PodOverrides::default();
        if let Some(v) = a.get(ANNOTATION_BYPASS_INBOUND) {
            pod.ingress_mode = parse_bool(ANNOTATION_BYPASS_INBOUND, v)?;
        }
        if let Some(v) = a.get(ANNOTATION_DNS_CAPTURE) {
            pod.dns = if parse_bool(ANNOTATION_DNS_CAPTURE, v)? {
                DnsOverride::Enabled
            } else {
                DnsOverride::Disabled
            };
        }
        if let Some(v) = a.get(ANNOTATION_VIRTUAL_INTERFACES) {
            for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                validate_ifname(item).map_err(|why| {
                    format!("annotation {ANNOTATION_VIRTUAL_INTERFACES}={v:?}: {why}")
                })?;
                pod.virtual_interfaces.push(item.to_string());
            }
        }
        Ok(pod)
    }

    /// Whether DNS is captured for this pod under `cfg`.
    pub fn dns_enabled(&self, cfg: &InpodConfig) -> bool {
        match self.dns {
            DnsOverride::Unset => cfg.redirect_dns,
            DnsOverride::Enabled => true,
            DnsOverride::Disabled => false,
        }
    }
}

const FOLD: NftSpelling = NftSpelling {
    fold_protocol: true,
    ports_before_addresses: false,
    meta_owner: false,
    tcp_only: false,
    mark_before_ports: false,
    mark: NftMarkWording::And,
    no_counter: false,
};

/// Jumps from the base chains carry no `counter` in Istio's nft rules.
const JUMP: NftSpelling = NftSpelling {
    fold_protocol: false,
    ports_before_addresses: false,
    meta_owner: false,
    tcp_only: false,
    mark_before_ports: false,
    mark: NftMarkWording::And,
    no_counter: true,
};

fn loopback(family: Family) -> Cidr {
    let net: IpNet = match family {
        Family::V4 => IpNet::from(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        Family::V6 => IpNet::from(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    };
    Cidr::new(net)
}

fn snat(cfg: &InpodConfig, family: Family) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(cfg.host_probe_snat_v4),
        Family::V6 => IpAddr::V6(cfg.host_probe_snat_v6),
    }
}

fn families(cfg: &InpodConfig) -> &'static [Family] {
    if cfg.enable_ipv6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    }
}

/// The in-pod rules (Istio `CreateInpodRules`, spec §7.5 builder order). Versioned rules are
/// emitted v4 then v6 (one list per family for iptables; nft renders them in this order).
pub fn pod_rules(cfg: &InpodConfig, pod: &PodOverrides) -> RuleSet {
    use Chain::{IstioOutput, IstioPrert, Output, Prerouting};
    use Table::{Mangle, Nat, Raw};
    let dns = pod.dns_enabled(cfg);
    let mut r: Vec<Rule> = Vec::new();
    let versioned = |r: &mut Vec<Rule>, f: &dyn Fn(Family) -> Rule| {
        for &family in families(cfg) {
            let mut rule = f(family);
            rule.scope = Scope::from(family);
            r.push(rule);
        }
    };
    let not_ztunnel = Match::MarkMasked {
        mark: INPOD_MARK,
        mask: INPOD_MASK,
        negate: true,
    };

    r.push(Rule::append(Mangle, Prerouting).nft(JUMP).jump(IstioPrert));
    r.push(Rule::append(Mangle, Output).nft(JUMP).jump(IstioOutput));
    r.push(Rule::append(Nat, Output).nft(JUMP).jump(IstioOutput));
    if dns {
        r.push(Rule::append(Raw, Prerouting).nft(JUMP).jump(IstioPrert));
        r.push(Rule::append(Raw, Output).nft(JUMP).jump(IstioOutput));
    }
    r.push(Rule::append(Nat, Prerouting).nft(JUMP).jump(IstioPrert));

    for iface in &pod.virtual_interfaces {
        r.push(
            Rule::append(Nat, IstioPrert)
                .in_iface(iface)
                .proto(Proto::Tcp)
                .to(Target::Redirect {
                    port: ZTUNNEL_OUTBOUND_PORT,
                    singular: false,
                }),
        );
        r.push(
            Rule::append(Nat, IstioPrert)
                .in_iface(iface)
                .proto(Proto::Tcp)
                .to(Target::Return),
        );
    }

    r.push(
        Rule::append(Mangle, IstioPrert)
            .mark_masked(INPOD_MARK, INPOD_MASK, false)
            .nft(NftSpelling {
                mark: NftMarkWording::MetaAmp,
                ..NftSpelling::default()
            })
            .to(Target::SetConnMark {
                mark: INPOD_TPROXY_MARK,
                mask: INPOD_MASK,
            }),
    );

    if !pod.ingress_mode {
        versioned(&mut r, &|f| {
            Rule::append(Nat, IstioPrert)
                .src(&Cidr::address(snat(cfg, f)))
                .proto(Proto::Tcp)
                .m(Match::ProtoModule)
                .to(Target::Accept)
        });
    }
    versioned(&mut r, &|f| {
        Rule::append(Nat, IstioOutput)
            .dst(&Cidr::address(snat(cfg, f)))
            .proto(Proto::Tcp)
            .m(Match::ProtoModule)
            .to(Target::Accept)
    });

    if !pod.ingress_mode {
        versioned(&mut r, &|f| {
            Rule::append(Nat, IstioPrert)
                .not_dst(&loopback(f))
                .proto(Proto::Tcp)
                .not_dport(ZTUNNEL_HBONE_PORT)
                .m(not_ztunnel.clone())
                .nft(NftSpelling {
                    // Istio's IPv4 string has a doubled space; the IPv6 one does not.
                    mark: if f == Family::V4 {
                        NftMarkWording::AndDoubleSpace
                    } else {
                        NftMarkWording::And
                    },
                    ..FOLD
                })
                .to(Target::Redirect {
                    port: ZTUNNEL_INBOUND_PORT,
                    singular: false,
                })
        });
    }

    r.push(
        Rule::append(Mangle, IstioOutput)
            .m(Match::ConnMarkMasked {
                mark: INPOD_TPROXY_MARK,
                mask: INPOD_MASK,
            })
            .to(Target::RestoreMarkMasked {
                nfmask: RESTORE_MASK,
                ctmask: RESTORE_MASK,
            }),
    );

    if dns {
        r.push(
            Rule::append(Nat, IstioOutput)
                .m(Match::NotOutInterface("lo".into()))
                .proto(Proto::Udp)
                .m(not_ztunnel.clone())
                .m(Match::ProtoModule)
                .dport(53)
                .nft(NftSpelling {
                    mark_before_ports: true,
                    ..FOLD
                })
                .to(Target::Redirect {
                    port: DNS_CAPTURE_PORT,
                    singular: true,
                }),
        );
        versioned(&mut r, &|f| {
            Rule::append(Nat, IstioOutput)
                .not_dst(&loopback(f))
                .proto(Proto::Tcp)
                .dport(53)
                .m(not_ztunnel.clone())
                .nft(FOLD)
                .to(Target::Redirect {
                    port: DNS_CAPTURE_PORT,
                    singular: false,
                })
        });
        let meta_and = NftSpelling {
            mark: NftMarkWording::MetaAnd,
            ..FOLD
        };
        r.push(
            Rule::append(Raw, IstioOutput)
                .proto(Proto::Udp)
                .mark_masked(INPOD_MARK, INPOD_MASK, false)
                .m(Match::ProtoModule)
                .dport(53)
                .nft(meta_and)
                .to(Target::CtZone(1)),
        );
        r.push(
            Rule::append(Raw, IstioPrert)
                .proto(Proto::Udp)
                .mark_masked(INPOD_MARK, INPOD_MASK, true)
                .m(Match::ProtoModule)
                .sport(53)
                .nft(meta_and)
                .to(Target::CtZone(1)),
        );
    }

    r.push(
        Rule::append(Nat, IstioOutput)
            .proto(Proto::Tcp)
            .mark_masked(INPOD_TPROXY_MARK, INPOD_MASK, false)
            .to(Target::Accept),
    );
    versioned(&mut r, &|f| {
        Rule::append(Nat, IstioOutput)
            .not_dst(&loopback(f))
            .out_iface("lo")
            .to(Target::Accept)
    });
    versioned(&mut r, &|f| {
        Rule::append(Nat, IstioOutput)
            .not_dst(&loopback(f))
            .proto(Proto::Tcp)
            .m(not_ztunnel.clone())
            .to(Target::Redirect {
                port: ZTUNNEL_OUTBOUND_PORT,
                singular: false,
            })
    });

    RuleSet {
        rules: r,
        ipv6: cfg.enable_ipv6,
        tproxy_routing: None,
        lo_ipv6_address: None,
    }
}

/// The host-netns probe SNAT rules for the iptables backend (Istio
/// `CreateHostRulesForHealthChecks`): `-I POSTROUTING 1 -j ISTIO_POSTRT` and, per family,
/// `-m owner --socket-exists -p tcp -m set --match-set <probe set> dst -j SNAT --to-source <addr>`.
pub fn host_rules_iptables(cfg: &InpodConfig) -> RuleSet {
    let mut r = vec![Rule::insert(Table::Nat, Chain::Postrouting, 1).jump(Chain::IstioPostrt)];
    for &family in families(cfg) {
        r.push(
            Rule::append(Table::Nat, Chain::IstioPostrt)
                .scope(Scope::from(family))
                .m(Match::SocketExists)
                .proto(Proto::Tcp)
                .m(Match::DestSet(probe_set(family).to_string()))
                .to(Target::Snat(snat(cfg, family))),
        );
    }
    RuleSet {
        rules: r,
        ipv6: cfg.enable_ipv6,
        tproxy_routing: None,
        lo_ipv6_address: None,
    }
}

/// The host-netns probe SNAT rules for the nftables backend: nft has no `--socket-exists`, so
/// the rule matches the kubelet's UID (`skuid`), in the `postrouting` base chain of
/// `inet istio-ambient-nat`.
pub fn host_rules_nft(cfg: &InpodConfig, kubelet_uid: u32) -> RuleSet {
    let uid = kubelet_uid.to_string();
    let mut r = Vec::new();
    for &family in families(cfg) {
        r.push(
            Rule::append(Table::Nat, Chain::Postrouting)
                .scope(Scope::from(family))
                .proto(Proto::Tcp)
                .owner(OwnerKind::Uid, &uid, false)
                .m(Match::DestSet(probe_set(family).to_string()))
                .to(Target::Snat(snat(cfg, family))),
        );
    }
    RuleSet {
        rules: r,
        ipv6: cfg.enable_ipv6,
        tproxy_routing: None,
        lo_ipv6_address: None,
    }
}

/// The probe set of a family.
pub fn probe_set(family: Family) -> &'static str {
    match family {
        Family::V4 => PROBE_SET_V4,
        Family::V6 => PROBE_SET_V6,
    }
}

const fn base(chain: Chain, ty: &'static str, hook: &'static str, prio: i32) -> NftChain {
    NftChain {
        chain,
        base: Some((ty, hook, prio)),
    }
}

const fn regular(chain: Chain) -> NftChain {
    NftChain { chain, base: None }
}

/// nft table of the host rule and the probe sets.
pub const NFT_NAT_TABLE: &str = "istio-ambient-nat";

/// Istio's in-pod nftables layout (`cni/pkg/nftables`).
pub const POD_NFT_LAYOUT: NftLayout = NftLayout {
    tables: &[
        (
            Table::Nat,
            NFT_NAT_TABLE,
            &[
                base(Chain::Prerouting, "nat", "prerouting", -100),
                base(Chain::Output, "nat", "output", -100),
                regular(Chain::IstioPrert),
                regular(Chain::IstioOutput),
            ],
        ),
        (
            Table::Mangle,
            "istio-ambient-mangle",
            &[
                base(Chain::Prerouting, "filter", "prerouting", -150),
                base(Chain::Output, "route", "output", -150),
                regular(Chain::IstioPrert),
                regular(Chain::IstioOutput),
            ],
        ),
        (
            Table::Raw,
            "istio-ambient-raw",
            &[
                base(Chain::Prerouting, "filter", "prerouting", -300),
                base(Chain::Output, "filter", "output", -300),
                regular(Chain::IstioPrert),
                regular(Chain::IstioOutput),
            ],
        ),
    ],
};

/// The host rule's nftables layout.
pub const HOST_NFT_LAYOUT: NftLayout = NftLayout {
    tables: &[(
        Table::Nat,
        NFT_NAT_TABLE,
        &[base(Chain::Postrouting, "nat", "postrouting", 100)],
    )],
};

/// `iptables-restore --noflush` input of the pod rules for `family` (empty for v6 with IPv6 off).
pub fn pod_restore(rs: &RuleSet, family: Family) -> String {
    iptables::render_restore(rs, family)
}

/// `iptables-restore --noflush` input of the host rules for `family`.
pub fn host_restore(rs: &RuleSet, family: Family) -> String {
    iptables::render_restore(rs, family)
}

/// The pod rules as one `nft -f` transaction (tables `inet istio-ambient-{nat,mangle,raw}`).
pub fn pod_nft(rs: &RuleSet) -> String {
    nft::render_with(rs, &POD_NFT_LAYOUT)
}

/// The host rules as one `nft -f` transaction (table `inet istio-ambient-nat`; the probe sets
/// are referenced, not created).
pub fn host_nft(rs: &RuleSet) -> String {
    nft::render_with(rs, &HOST_NFT_LAYOUT)
}

/// The pod nft tables (names, family `inet`).
pub fn pod_nft_tables() -> Vec<&'static str> {
    POD_NFT_LAYOUT.tables.iter().map(|(_, n, _)| *n).collect()
}

/// iptables names of [`POD_CHAINS`].
pub fn pod_chain_names() -> Vec<String> {
    POD_CHAINS
        .iter()
        .map(|c| c.iptables_name().to_string())
        .collect()
}

/// iptables names of [`HOST_CHAINS`].
pub fn host_chain_names() -> Vec<String> {
    HOST_CHAINS
        .iter()
        .map(|c| c.iptables_name().to_string())
        .collect()
}

/// The in-pod policy routing (spec §7.5): `ip rule add fwmark 0x111/0xfff pref 32764 lookup
/// 100` and `ip route replace local 0.0.0.0/0 dev lo table 100`, for v4 and (with IPv6, when
/// `lo` has IPv6) v6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InpodRouting {
    pub fwmark: u32,
    pub mask: u32,
    pub priority: u32,
    pub table: u32,
    /// Also for IPv6.
    pub ipv6: bool,
}

/// [`InpodRouting`] for `cfg`.
pub fn pod_routing(cfg: &InpodConfig) -> InpodRouting {
    InpodRouting {
        fwmark: INPOD_TPROXY_MARK,
        mask: INPOD_MASK,
        priority: RULE_PRIORITY,
        table: ROUTE_TABLE,
        ipv6: cfg.enable_ipv6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn annotations_are_parsed_like_istio() {
        assert_eq!(
            PodOverrides::from_annotations(&ann(&[])).expect("none"),
            PodOverrides::default()
        );
        let pod = PodOverrides::from_annotations(&ann(&[
            (ANNOTATION_BYPASS_INBOUND, "true"),
            (ANNOTATION_DNS_CAPTURE, "False"),
            (ANNOTATION_VIRTUAL_INTERFACES, " eth1 ,, net1+ ,"),
            ("other", "x"),
        ]))
        .expect("valid");
        assert!(pod.ingress_mode);
        assert_eq!(pod.dns, DnsOverride::Disabled);
        assert_eq!(pod.virtual_interfaces, vec!["eth1", "net1+"]);
        assert_eq!(
            PodOverrides::from_annotations(&ann(&[(ANNOTATION_DNS_CAPTURE, "1")]))
                .expect("1")
                .dns,
            DnsOverride::Enabled
        );
    }

    #[test]
    fn invalid_annotations_name_key_value_and_why() {
        let e = PodOverrides::from_annotations(&ann(&[(ANNOTATION_BYPASS_INBOUND, "yes")]))
            .expect_err("yes is not a Go bool");
        assert_eq!(
            e,
            "annotation ambient.istio.io/bypass-inbound-capture=\"yes\": not a boolean (expected true or false)"
        );
        let e = PodOverrides::from_annotations(&ann(&[(ANNOTATION_DNS_CAPTURE, "")]))
            .expect_err("empty");
        assert!(e.contains(ANNOTATION_DNS_CAPTURE), "{e}");
        for (bad, why) in [
            ("averyveryverylongname", "at most 15"),
            ("eth/0", "'/'"),
            ("eth:0", "':'"),
            ("e\"x", "'\"'"),
            ("!eth0", "negation"),
            ("..", "not allowed"),
        ] {
            let e = PodOverrides::from_annotations(&ann(&[(
                ANNOTATION_VIRTUAL_INTERFACES,
                &format!("eth1,{bad}"),
            )]))
            .expect_err(bad);
            assert!(
                e.starts_with("annotation istio.io/reroute-virtual-interfaces=") && e.contains(why),
                "{bad}: {e}"
            );
        }
        // Whitespace inside an item (items are trimmed, so only inner whitespace remains).
        let e = PodOverrides::from_annotations(&ann(&[(ANNOTATION_VIRTUAL_INTERFACES, "a b")]))
            .expect_err("inner space");
        assert!(e.contains("' '"), "{e}");
    }

    #[test]
    fn defaults_are_the_product_defaults() {
        let c = InpodConfig::default();
        assert!(c.redirect_dns && c.enable_ipv6);
        assert_eq!(c.host_probe_snat_v4.to_string(), "169.254.7.127");
        assert_eq!(
            c.host_probe_snat_v6.to_string(),
            "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
        );
    }

    #[test]
    fn ipv4_only_has_no_v6_rules_and_routing_follows_ipv6() {
        let cfg = InpodConfig {
            enable_ipv6: false,
            ..InpodConfig::default()
        };
        let rs = pod_rules(&cfg, &PodOverrides::default());
        assert!(pod_restore(&rs, Family::V6).is_empty());
        assert!(!pod_nft(&rs).contains("ip6 "));
        assert!(!pod_routing(&cfg).ipv6);
        assert!(pod_routing(&InpodConfig::default()).ipv6);
    }
}
