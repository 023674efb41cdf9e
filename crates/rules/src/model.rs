//! The rule model shared by every generator and both renderers.
//!
//! A [`Rule`] is one packet-filter rule described with typed matches and a typed target, in the
//! order `iptables` prints them. Generators decide *which* rules exist and in *which* order; the
//! renderers ([`crate::iptables`], [`crate::nft`]) only decide how a rule is spelled. Where the
//! Istio nftables reference spells a rule differently from its iptables twin (token order,
//! `meta skuid` vs `skuid`, `tcp dport` vs `meta l4proto tcp tcp dport`), the rule carries an
//! explicit [`NftSpelling`] hint instead of the renderer guessing from the rule's identity.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// IP family of one iptables backend (`iptables` vs `ip6tables`) or of an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

/// Which per-family rule list(s) a rule belongs to.
///
/// Istio keeps one list per family ("versioned" rules add a v4 variant to the v4 list and a v6
/// variant to the v6 list; plain rules go to both). The nftables backend uses one `inet` table,
/// so it renders every rule of the set once, in emission order, whatever its scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Both,
    V4,
    V6,
}

impl Scope {
    /// Whether a rule with this scope belongs to `family`'s rule list.
    pub fn includes(self, family: Family) -> bool {
        matches!(
            (self, family),
            (Scope::Both, _) | (Scope::V4, Family::V4) | (Scope::V6, Family::V6)
        )
    }

    /// The scope covering exactly the given families (`None` when neither).
    pub fn of(v4: bool, v6: bool) -> Option<Scope> {
        match (v4, v6) {
            (true, true) => Some(Scope::Both),
            (true, false) => Some(Scope::V4),
            (false, true) => Some(Scope::V6),
            (false, false) => None,
        }
    }
}

impl From<Family> for Scope {
    fn from(f: Family) -> Scope {
        match f {
            Family::V4 => Scope::V4,
            Family::V6 => Scope::V6,
        }
    }
}

/// Netfilter table. `Ord` is the iptables-restore emission order (sorted by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Mangle,
    Nat,
    Raw,
}

impl Table {
    /// All tables in iptables-restore (name-sorted) order.
    pub const ALL: [Table; 3] = [Table::Mangle, Table::Nat, Table::Raw];

    /// The iptables table name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Mangle => "mangle",
            Table::Nat => "nat",
            Table::Raw => "raw",
        }
    }
}

/// A chain: the netfilter built-ins plus the chains Istio's capture generator creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Chain {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
    IstioInbound,
    IstioRedirect,
    IstioInRedirect,
    IstioOutput,
    IstioOutputDns,
    IstioDivert,
    IstioTproxy,
    IstioDrop,
    /// Ambient in-pod / host-probe chains (spec §7.5).
    IstioPrert,
    IstioPostrt,
}

impl Chain {
    /// Whether the chain is a netfilter built-in (never declared with `-N`, never deleted).
    pub fn is_builtin(self) -> bool {
        matches!(
            self,
            Chain::Prerouting | Chain::Input | Chain::Forward | Chain::Output | Chain::Postrouting
        )
    }

    /// The iptables spelling (`PREROUTING`, `ISTIO_INBOUND`, ...).
    pub fn iptables_name(self) -> &'static str {
        match self {
            Chain::Prerouting => "PREROUTING",
            Chain::Input => "INPUT",
            Chain::Forward => "FORWARD",
            Chain::Output => "OUTPUT",
            Chain::Postrouting => "POSTROUTING",
            Chain::IstioInbound => "ISTIO_INBOUND",
            Chain::IstioRedirect => "ISTIO_REDIRECT",
            Chain::IstioInRedirect => "ISTIO_IN_REDIRECT",
            Chain::IstioOutput => "ISTIO_OUTPUT",
            Chain::IstioOutputDns => "ISTIO_OUTPUT_DNS",
            Chain::IstioDivert => "ISTIO_DIVERT",
            Chain::IstioTproxy => "ISTIO_TPROXY",
            Chain::IstioDrop => "ISTIO_DROP",
            Chain::IstioPrert => "ISTIO_PRERT",
            Chain::IstioPostrt => "ISTIO_POSTRT",
        }
    }

    /// The nftables spelling (`prerouting`, `istio-inbound`, ...).
    pub fn nft_name(self) -> &'static str {
        match self {
            Chain::Prerouting => "prerouting",
            Chain::Input => "input",
            Chain::Forward => "forward",
            Chain::Output => "output",
            Chain::Postrouting => "postrouting",
            Chain::IstioInbound => "istio-inbound",
            Chain::IstioRedirect => "istio-redirect",
            Chain::IstioInRedirect => "istio-in-redirect",
            Chain::IstioOutput => "istio-output",
            Chain::IstioOutputDns => "istio-output-dns",
            Chain::IstioDivert => "istio-divert",
            Chain::IstioTproxy => "istio-tproxy",
            Chain::IstioDrop => "istio-drop",
            Chain::IstioPrert => "istio-prerouting",
            Chain::IstioPostrt => "istio-postrouting",
        }
    }
}

/// Where a rule goes in its chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Position {
    /// `-A`: at the end.
    Append,
    /// `-I <n>`: at 1-based position `n` (nft: `index n-1`).
    Insert(u32),
}

/// Layer-4 protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// An address/prefix as it is written into a rule.
///
/// The typed prefix is kept for logic (family, loopback checks); the text is what gets
/// rendered. They differ only where Istio renders a user string verbatim: DNS server addresses
/// are written as `<server>/32|/128` from the resolv.conf text (so `::127.0.0.53` stays
/// `::127.0.0.53/128` instead of the canonical `::7f00:35/128`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Cidr {
    net: IpNet,
    text: String,
}

impl Cidr {
    /// A prefix rendered in canonical form (`ipnet` keeps host bits, like Go's `netip.Prefix`:
    /// `127.0.0.1/8` stays `127.0.0.1/8`).
    pub fn new(net: IpNet) -> Cidr {
        Cidr {
            text: net.to_string(),
            net,
        }
    }

    /// A single host (`/32` or `/128`) whose address keeps the caller's spelling.
    /// A single host written as a bare address (`-s 169.254.7.127`, nft `ip saddr
    /// 169.254.7.127`); `iptables-save` still prints it with its `/32` or `/128`.
    pub fn address(addr: IpAddr) -> Cidr {
        Cidr {
            text: addr.to_string(),
            net: IpNet::from(addr),
        }
    }

    pub fn host_verbatim(addr: IpAddr, text: &str) -> Cidr {
        let net = IpNet::from(addr);
        Cidr {
            text: format!("{}/{}", text, net.prefix_len()),
            net,
        }
    }

    pub fn net(&self) -> IpNet {
        self.net
    }

    pub fn family(&self) -> Family {
        match self.net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Socket owner selector of `-m owner`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OwnerKind {
    Uid,
    Gid,
}

/// Connection tracking state of `-m conntrack --ctstate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CtState {
    Invalid,
    New,
    Related,
    Established,
}

impl CtState {
    pub fn iptables_name(self) -> &'static str {
        match self {
            CtState::Invalid => "INVALID",
            CtState::New => "NEW",
            CtState::Related => "RELATED",
            CtState::Established => "ESTABLISHED",
        }
    }

    pub fn nft_name(self) -> &'static str {
        match self {
            CtState::Invalid => "invalid",
            CtState::New => "new",
            CtState::Related => "related",
            CtState::Established => "established",
        }
    }
}

/// One match of a rule. Port matches take their protocol from the rule's [`Match::Protocol`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Match {
    /// `-p tcp`
    Protocol(Proto),
    /// `[!] -s <cidr>`
    Source { cidr: Cidr, negate: bool },
    /// `[!] -d <cidr>`
    Destination { cidr: Cidr, negate: bool },
    /// `-i <iface>`
    InInterface(String),
    /// `-o <iface>`
    OutInterface(String),
    /// `[!] --dport <port>`
    DestPort { port: u16, negate: bool },
    /// `[!] --sport <port>`
    SourcePort { port: u16, negate: bool },
    /// `-m multiport [!] --dports <p1>,<p2>...`
    DestPorts { ports: Vec<u16>, negate: bool },
    /// `-m owner [!] --uid-owner|--gid-owner <id>` (ids may be names for groups)
    Owner {
        kind: OwnerKind,
        id: String,
        negate: bool,
    },
    /// `-m mark [!] --mark <mark>`
    Mark { mark: u32, negate: bool },
    /// `-m connmark --mark <mark>`
    ConnMark { mark: u32 },
    /// `-m conntrack --ctstate <s1>,<s2>...`
    CtState(Vec<CtState>),
    /// `! -o <iface>`
    NotOutInterface(String),
    /// `-m mark [!] --mark <mark>/<mask>` (hex, as Istio's ambient rules spell it)
    MarkMasked { mark: u32, mask: u32, negate: bool },
    /// `-m connmark --mark <mark>/<mask>` (hex)
    ConnMarkMasked { mark: u32, mask: u32 },
    /// `-m <proto>`: the protocol's match module named explicitly (`-p tcp -m tcp`), where the
    /// reference writes it; port matches that follow it belong to it. nft: nothing.
    ProtoModule,
    /// `-m owner --socket-exists` (iptables only; nft has no equivalent).
    SocketExists,
    /// `-m set --match-set <set> dst`; nft `ip daddr @<set>` / `ip6 daddr @<set>` (family
    /// from the rule's scope: a set holds one family).
    DestSet(String),
}

/// What a rule does with a matching packet.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Jump(Chain),
    Return,
    Accept,
    Drop,
    /// `-j REDIRECT --to-ports <port>`; `singular` spells `--to-port` (Istio's UDP DNS rule).
    Redirect {
        port: u16,
        singular: bool,
    },
    /// `-j TPROXY --tproxy-mark <mark>/<mask> --on-port <port>`
    Tproxy {
        port: u16,
        mark: u32,
        mask: u32,
    },
    /// `-j MARK --set-mark <mark>`
    SetMark(u32),
    /// `-j CONNMARK --save-mark`
    SaveMark,
    /// `-j CONNMARK --restore-mark`
    RestoreMark,
    /// `-j CT --zone <zone>`
    CtZone(u16),
    /// `-j CONNMARK --set-xmark <mark>/<mask>` (hex); nft `ct mark set ct mark & ~mask | mark`.
    SetConnMark {
        mark: u32,
        mask: u32,
    },
    /// `-j CONNMARK --restore-mark --nfmask <m> --ctmask <m>` (hex); nft `meta mark set ct mark`.
    RestoreMarkMasked {
        nfmask: u32,
        ctmask: u32,
    },
    /// `-j SNAT --to-source <addr>`; nft `snat to <addr>`.
    Snat(IpAddr),
}

/// How the nftables reference words a rule, where that is not derivable from the matches.
///
/// Default: `meta l4proto <p>` for the protocol, matches in nft canonical order
/// (interface, protocol, ct state, addresses, ports, owner, mark, ct mark), `skuid`/`skgid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NftSpelling {
    /// Fold the protocol into the port match (`tcp dport 53`) instead of a separate
    /// `meta l4proto tcp` (only when the rule has a port match).
    pub fold_protocol: bool,
    /// Put port matches before address matches (`udp dport 53 ip daddr ...`).
    pub ports_before_addresses: bool,
    /// Spell owner matches `meta skuid` / `meta skgid`.
    pub meta_owner: bool,
    /// The nft reference restricts this rule to TCP (`meta l4proto tcp`) although the iptables
    /// twin matches every protocol (Istio's invalid-drop rule).
    pub tcp_only: bool,
    /// Put mark matches before port matches (`oifname != lo mark and 0xfff != 0x539 udp dport
    /// 53`: Istio's in-pod UDP DNS rule).
    pub mark_before_ports: bool,
    /// How a masked mark match ([`Match::MarkMasked`]) is worded.
    pub mark: NftMarkWording,
    /// No `counter` statement (Istio's in-pod jumps from the base chains have none).
    pub no_counter: bool,
}

/// Wording of a masked mark match in the nft reference, which varies per rule (Istio's
/// in-pod rules are hand-written strings): `mark and 0xfff != 0x539` ([`NftMarkWording::And`]),
/// the same with a doubled space before the operator ([`NftMarkWording::AndDoubleSpace`], the
/// IPv4 inbound redirect), `meta mark and 0xfff == 0x539` ([`NftMarkWording::MetaAnd`]) and
/// `meta mark & 0xfff == 0x539` ([`NftMarkWording::MetaAmp`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NftMarkWording {
    #[default]
    And,
    AndDoubleSpace,
    MetaAnd,
    MetaAmp,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub table: Table,
    pub chain: Chain,
    pub position: Position,
    pub scope: Scope,
    /// In iptables print order.
    pub matches: Vec<Match>,
    pub target: Target,
    pub nft: NftSpelling,
}

impl Rule {
    /// Start an appended rule (scope [`Scope::Both`], default nft spelling).
    pub fn append(table: Table, chain: Chain) -> RuleBuilder {
        RuleBuilder::new(table, chain, Position::Append)
    }

    /// Start a rule inserted at 1-based position `pos`.
    pub fn insert(table: Table, chain: Chain, pos: u32) -> RuleBuilder {
        RuleBuilder::new(table, chain, Position::Insert(pos))
    }

    /// The protocol of the rule's `-p` match, if any.
    pub fn protocol(&self) -> Option<Proto> {
        self.matches.iter().find_map(|m| match m {
            Match::Protocol(p) => Some(*p),
            _ => None,
        })
    }
}

/// Fluent constructor for [`Rule`]; finish with [`RuleBuilder::to`].
#[derive(Debug, Clone)]
pub struct RuleBuilder {
    rule: Rule,
}

impl RuleBuilder {
    fn new(table: Table, chain: Chain, position: Position) -> RuleBuilder {
        RuleBuilder {
            rule: Rule {
                table,
                chain,
                position,
                scope: Scope::Both,
                matches: Vec::new(),
                target: Target::Return,
                nft: NftSpelling::default(),
            },
        }
    }

    pub fn scope(mut self, scope: Scope) -> Self {
        self.rule.scope = scope;
        self
    }

    pub fn nft(mut self, spelling: NftSpelling) -> Self {
        self.rule.nft = spelling;
        self
    }

    /// Add a match (call in iptables print order).
    pub fn m(mut self, m: Match) -> Self {
        self.rule.matches.push(m);
        self
    }

    pub fn proto(self, p: Proto) -> Self {
        self.m(Match::Protocol(p))
    }

    pub fn dport(self, port: u16) -> Self {
        self.m(Match::DestPort {
            port,
            negate: false,
        })
    }

    pub fn not_dport(self, port: u16) -> Self {
        self.m(Match::DestPort { port, negate: true })
    }

    pub fn sport(self, port: u16) -> Self {
        self.m(Match::SourcePort {
            port,
            negate: false,
        })
    }

    pub fn src(self, cidr: &Cidr) -> Self {
        self.m(Match::Source {
            cidr: cidr.clone(),
            negate: false,
        })
    }

    pub fn dst(self, cidr: &Cidr) -> Self {
        self.m(Match::Destination {
            cidr: cidr.clone(),
            negate: false,
        })
    }

    pub fn not_dst(self, cidr: &Cidr) -> Self {
        self.m(Match::Destination {
            cidr: cidr.clone(),
            negate: true,
        })
    }

    pub fn in_iface(self, iface: &str) -> Self {
        self.m(Match::InInterface(iface.to_owned()))
    }

    pub fn out_iface(self, iface: &str) -> Self {
        self.m(Match::OutInterface(iface.to_owned()))
    }

    pub fn owner(self, kind: OwnerKind, id: &str, negate: bool) -> Self {
        self.m(Match::Owner {
            kind,
            id: id.to_owned(),
            negate,
        })
    }

    pub fn mark(self, mark: u32, negate: bool) -> Self {
        self.m(Match::Mark { mark, negate })
    }

    pub fn mark_masked(self, mark: u32, mask: u32, negate: bool) -> Self {
        self.m(Match::MarkMasked { mark, mask, negate })
    }

    pub fn ctstate(self, states: &[CtState]) -> Self {
        self.m(Match::CtState(states.to_vec()))
    }

    /// Finish the rule with its target.
    pub fn to(mut self, target: Target) -> Rule {
        self.rule.target = target;
        self.rule
    }

    /// Finish the rule with `-j <chain>`.
    pub fn jump(self, chain: Chain) -> Rule {
        self.to(Target::Jump(chain))
    }
}
