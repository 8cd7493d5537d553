//! The nat rules that make a network namespace a meshed pod, as `iptables-restore`
//! input: pure, so what `--dry-run` prints is exactly what is applied.
//!
//! strait's rules live in chains of their own, reached by one jump each from
//! `PREROUTING` and `OUTPUT`. Declaring a chain in restore input empties it, so
//! applying twice leaves one set of rules; the jumps are added only when absent.

use std::fmt::Write as _;

pub use crate::addr::IpNet;
use crate::addr::PortSet;

pub const INBOUND_CHAIN: &str = "STRAIT_INBOUND";
pub const OUTBOUND_CHAIN: &str = "STRAIT_OUTBOUND";
/// The hook each chain is reached from: connections arriving at the pod, and
/// connections the pod's processes open.
pub const INBOUND_HOOK: &str = "PREROUTING";
pub const OUTBOUND_HOOK: &str = "OUTPUT";

/// What to redirect and what to leave alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub inbound_port: u16,
    pub outbound_port: u16,
    /// The proxy's own connections are never redirected (they would loop).
    pub proxy_uid: u32,
    /// Inbound ports that reach the app (or the proxy) directly.
    pub skip_inbound_ports: PortSet,
    pub skip_outbound_ports: PortSet,
    /// Of either family: each goes to its own family's rules.
    pub skip_outbound_cidrs: Vec<IpNet>,
    /// The app's IPv6 connections go to the proxy too.
    pub ipv6_outbound: bool,
}

/// The chain prefixes of other meshes' interception rules: Istio's (sidecar
/// and ambient), Linkerd's, Kuma's and Consul's.
const OTHER_MESHES_CHAINS: [&str; 4] = ["ISTIO_", "PROXY_INIT_", "KUMA_", "CONSUL_"];

/// A chain of another mesh's in `iptables-save -t nat` output: its rules
/// would send strait's traffic astray and strait's its (the pod's namespace
/// enrolled in Istio's ambient mesh, which the injector cannot see).
pub fn other_mesh_chain(save: &str) -> Option<&str> {
    save.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .find(|chain| OTHER_MESHES_CHAINS.iter().any(|p| chain.starts_with(p)))
}

/// Whether the hooks already jump to strait's chains (from `iptables-save -t nat`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Installed {
    pub inbound_jump: bool,
    pub outbound_jump: bool,
}

impl Installed {
    pub fn from_save(save: &str) -> Self {
        let jump = |hook: &str, chain: &str| {
            let rule = format!("-A {hook} -p tcp -j {chain}");
            save.lines().any(|l| l.trim_end() == rule)
        };
        Installed {
            inbound_jump: jump(INBOUND_HOOK, INBOUND_CHAIN),
            outbound_jump: jump(OUTBOUND_HOOK, OUTBOUND_CHAIN),
        }
    }
}

impl Plan {
    /// `iptables-restore --noflush` input for the nat table.
    pub fn restore_input(&self, installed: Installed) -> String {
        let mut out = String::from("*nat\n");
        for chain in [INBOUND_CHAIN, OUTBOUND_CHAIN] {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }

        self.inbound_rules(&mut out);

        self.outbound_rules(&mut out, "127.0.0.0/8", IpNet::is_ipv4);
        if !installed.inbound_jump {
            let _ = writeln!(out, "-A {INBOUND_HOOK} -p tcp -j {INBOUND_CHAIN}");
        }
        if !installed.outbound_jump {
            let _ = writeln!(out, "-A {OUTBOUND_HOOK} -p tcp -j {OUTBOUND_CHAIN}");
        }
        out.push_str("COMMIT\n");
        out
    }
}

impl Plan {
    /// Inbound: every TCP connection to the pod goes to the proxy, except to
    /// the proxy's own inbound port (peers dial it directly) and skipped ports.
    fn inbound_rules(&self, out: &mut String) {
        let mut skip_in = self.skip_inbound_ports.clone();
        skip_in.insert(self.inbound_port);
        for range in ranges(&skip_in) {
            let _ = writeln!(out, "-A {INBOUND_CHAIN} -p tcp --dport {range} -j RETURN");
        }
        let _ = writeln!(
            out,
            "-A {INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        );
    }

    /// Outbound: the app's TCP connections go to the proxy; the proxy's own
    /// (by uid), loopback's and skipped destinations go out as they are.
    fn outbound_rules(&self, out: &mut String, loopback: &str, family: fn(&IpNet) -> bool) {
        let o = OUTBOUND_CHAIN;
        let _ = writeln!(
            out,
            "-A {o} -m owner --uid-owner {} -j RETURN",
            self.proxy_uid
        );
        let _ = writeln!(out, "-A {o} -o lo -j RETURN");
        let _ = writeln!(out, "-A {o} -d {loopback} -j RETURN");
        for range in ranges(&self.skip_outbound_ports) {
            let _ = writeln!(out, "-A {o} -p tcp --dport {range} -j RETURN");
        }
        for cidr in self.skip_outbound_cidrs.iter().filter(|c| family(c)) {
            let _ = writeln!(out, "-A {o} -d {cidr} -j RETURN");
        }
        let _ = writeln!(
            out,
            "-A {o} -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        );
    }

    /// The IPv6 rules (`ip6tables-restore --noflush`), as the IPv4 ones: the
    /// proxy listens on IPv6 too (inbound on `[::]`, outbound on `[::1]`), so
    /// a dual-stack Service's IPv6 leg is meshed like its IPv4 one. Where the
    /// proxy cannot listen on IPv6 (a kernel without it), there are no IPv6
    /// connections to redirect.
    pub fn restore_input_v6(&self, installed: Installed) -> String {
        let mut out = String::from("*nat\n");
        for chain in [INBOUND_CHAIN, OUTBOUND_CHAIN] {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        self.inbound_rules(&mut out);
        if self.ipv6_outbound {
            // Link-local destinations too: their scope (the interface) does
            // not survive the redirect, and the proxy could not dial them.
            let _ = writeln!(out, "-A {OUTBOUND_CHAIN} -d fe80::/10 -j RETURN");
            self.outbound_rules(&mut out, "::1/128", |c| !c.is_ipv4());
        }
        if !installed.inbound_jump {
            let _ = writeln!(out, "-A {INBOUND_HOOK} -p tcp -j {INBOUND_CHAIN}");
        }
        if self.ipv6_outbound && !installed.outbound_jump {
            let _ = writeln!(out, "-A {OUTBOUND_HOOK} -p tcp -j {OUTBOUND_CHAIN}");
        }
        out.push_str("COMMIT\n");
        out
    }
}

/// Where the IPv6 nat rules cannot be loaded (no `ip6table_nat`) and the pod
/// has no IPv6 address but link-local ones: other hosts' new TCP connections
/// over IPv6 are refused in the filter table instead, so that a neighbour on
/// the pod's link cannot reach the app at its link-local address around the
/// proxy. The pod serves nothing over IPv6. `jumped`: `INPUT` already jumps
/// to the chain (from `ip6tables-save -t filter`).
pub fn refuse_v6_input(jumped: bool) -> String {
    let mut out = String::from("*filter\n");
    let _ = writeln!(out, ":{INBOUND_CHAIN} - [0:0]");
    let _ = writeln!(
        out,
        "-A {INBOUND_CHAIN} ! -i lo -p tcp --syn -j REJECT --reject-with tcp-reset"
    );
    if !jumped {
        let _ = writeln!(out, "-A INPUT -p tcp -j {INBOUND_CHAIN}");
    }
    out.push_str("COMMIT\n");
    out
}

/// Whether `INPUT` jumps to strait's chain (from `ip6tables-save -t filter`).
pub fn input_jumps(save: &str) -> bool {
    let rule = format!("-A INPUT -p tcp -j {INBOUND_CHAIN}");
    save.lines().any(|l| l.trim_end() == rule)
}

/// Consecutive ports as iptables ranges ("8000:8100"), one per rule: no
/// multiport, so there is no limit of 15 per rule to split around.
fn ranges(ports: &PortSet) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = ports.iter().peekable();
    while let Some(lo) = it.next() {
        let mut hi = lo;
        while it.peek() == Some(&(hi.wrapping_add(1))) && hi < u16::MAX {
            hi += 1;
            it.next();
        }
        out.push(if lo == hi {
            lo.to_string()
        } else {
            format!("{lo}:{hi}")
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            inbound_port: 4143,
            outbound_port: 4140,
            proxy_uid: 2102,
            skip_inbound_ports: "22,4191".parse().unwrap(),
            skip_outbound_ports: "443,8000-8002".parse().unwrap(),
            skip_outbound_cidrs: vec![
                "10.96.0.0/12".parse().unwrap(),
                "fd00:10:96::/112".parse().unwrap(),
            ],
            ipv6_outbound: true,
        }
    }

    #[test]
    fn a_fresh_namespace_gets_both_chains_and_their_jumps() {
        let rules = plan().restore_input(Installed::default());
        let expected = "\
*nat
:STRAIT_INBOUND - [0:0]
:STRAIT_OUTBOUND - [0:0]
-A STRAIT_INBOUND -p tcp --dport 22 -j RETURN
-A STRAIT_INBOUND -p tcp --dport 4143 -j RETURN
-A STRAIT_INBOUND -p tcp --dport 4191 -j RETURN
-A STRAIT_INBOUND -p tcp -j REDIRECT --to-ports 4143
-A STRAIT_OUTBOUND -m owner --uid-owner 2102 -j RETURN
-A STRAIT_OUTBOUND -o lo -j RETURN
-A STRAIT_OUTBOUND -d 127.0.0.0/8 -j RETURN
-A STRAIT_OUTBOUND -p tcp --dport 443 -j RETURN
-A STRAIT_OUTBOUND -p tcp --dport 8000:8002 -j RETURN
-A STRAIT_OUTBOUND -d 10.96.0.0/12 -j RETURN
-A STRAIT_OUTBOUND -p tcp -j REDIRECT --to-ports 4140
-A PREROUTING -p tcp -j STRAIT_INBOUND
-A OUTPUT -p tcp -j STRAIT_OUTBOUND
COMMIT
";
        assert_eq!(rules, expected);
    }

    #[test]
    fn a_second_run_adds_no_second_jump() {
        let first = plan().restore_input(Installed::default());
        let installed = Installed::from_save(&first);
        assert!(installed.inbound_jump && installed.outbound_jump);
        let second = plan().restore_input(installed);
        assert!(!second.contains("-A PREROUTING") && !second.contains("-A OUTPUT"));
        assert!(
            second.contains(":STRAIT_INBOUND - [0:0]"),
            "chains are re-declared, so emptied"
        );
    }

    /// Another mesh's chains are found by their prefixes; strait's own and
    /// the kernel's are not another mesh's.
    #[test]
    fn another_mesh_s_chains_are_found_by_name() {
        let ours = plan().restore_input(Installed::default());
        assert_eq!(other_mesh_chain(&ours), None);
        let kube = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n-A OUTPUT -j KUBE-SERVICES\nCOMMIT\n";
        assert_eq!(other_mesh_chain(kube), None);
        for (chain, save) in [
            (
                "ISTIO_PRERT",
                ":ISTIO_PRERT - [0:0]\n:ISTIO_OUTPUT - [0:0]\n",
            ),
            (
                "PROXY_INIT_REDIRECT",
                ":OUTPUT ACCEPT [0:0]\n:PROXY_INIT_REDIRECT - [0:0]\n",
            ),
            ("KUMA_MESH_INBOUND", ":KUMA_MESH_INBOUND - [0:0]\n"),
        ] {
            assert_eq!(other_mesh_chain(save), Some(chain));
        }
    }

    /// A dual-stack pod's IPv6 connections are meshed as its IPv4 ones, with
    /// IPv6 loopback and IPv6 skipped networks left alone.
    #[test]
    fn ipv6_gets_the_same_rules_with_its_own_loopback_and_networks() {
        let v6 = plan().restore_input_v6(Installed::default());
        let expected = "\
*nat
:STRAIT_INBOUND - [0:0]
:STRAIT_OUTBOUND - [0:0]
-A STRAIT_INBOUND -p tcp --dport 22 -j RETURN
-A STRAIT_INBOUND -p tcp --dport 4143 -j RETURN
-A STRAIT_INBOUND -p tcp --dport 4191 -j RETURN
-A STRAIT_INBOUND -p tcp -j REDIRECT --to-ports 4143
-A STRAIT_OUTBOUND -d fe80::/10 -j RETURN
-A STRAIT_OUTBOUND -m owner --uid-owner 2102 -j RETURN
-A STRAIT_OUTBOUND -o lo -j RETURN
-A STRAIT_OUTBOUND -d ::1/128 -j RETURN
-A STRAIT_OUTBOUND -p tcp --dport 443 -j RETURN
-A STRAIT_OUTBOUND -p tcp --dport 8000:8002 -j RETURN
-A STRAIT_OUTBOUND -d fd00:10:96::/112 -j RETURN
-A STRAIT_OUTBOUND -p tcp -j REDIRECT --to-ports 4140
-A PREROUTING -p tcp -j STRAIT_INBOUND
-A OUTPUT -p tcp -j STRAIT_OUTBOUND
COMMIT
";
        assert_eq!(v6, expected);
        let again = plan().restore_input_v6(Installed::from_save(&v6));
        assert!(!again.contains("-A PREROUTING") && !again.contains("-A OUTPUT"));
        // For a proxy that does not listen on IPv6 loopback: inbound only.
        let inbound_only = Plan {
            ipv6_outbound: false,
            ..plan()
        }
        .restore_input_v6(Installed::default());
        assert!(inbound_only.contains("-A PREROUTING -p tcp -j STRAIT_INBOUND"));
        assert!(
            !inbound_only.contains("-A OUTPUT")
                && !inbound_only.contains("REDIRECT --to-ports 4140")
        );
    }

    #[test]
    fn cidrs_are_checked() {
        for (given, read) in [
            ("10.0.0.1", "10.0.0.1/32"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("fd00::/8", "fd00::/8"),
            ("fd00::1", "fd00::1/128"),
            ("::/0", "::/0"),
        ] {
            assert_eq!(given.parse::<IpNet>().unwrap().to_string(), read);
        }
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/33",
            "fd00::1/64",
            "fd00::/129",
            "10.0.0/8",
            "x",
            "10.0.0.0/",
        ] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
    }
}
