//! `strait-proxy init`: the nat rules that send a pod's TCP through its proxy.
//! Runs once per pod, as the injected init container (NET_ADMIN and NET_RAW are
//! all it needs), or as `ip netns exec POD strait-proxy init` in tests.

pub mod rules;

use std::io::Write as _;
use std::process::{Command, Stdio};

use clap::{Args, ValueEnum};

use crate::addr::PortSet;
use crate::defaults;
use rules::{Installed, IpNet, Plan};

#[derive(Clone, Debug, Args)]
pub struct InitArgs {
    /// The proxy's inbound port: connections to the pod are redirected here.
    #[arg(long, env = "STRAIT_PROXY_INBOUND_PORT", default_value_t = defaults::INBOUND_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_port: u16,
    /// The proxy's outbound port: the app's connections are redirected here.
    #[arg(long, env = "STRAIT_PROXY_OUTBOUND_PORT", default_value_t = defaults::OUTBOUND_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,
    /// The uid the proxy runs as: its own connections are never redirected.
    #[arg(long, env = "STRAIT_PROXY_UID", default_value_t = defaults::PROXY_UID)]
    pub proxy_uid: u32,
    /// Inbound ports that bypass the proxy (comma-separated, ranges allowed). The
    /// admin port is always among them, so the kubelet's probes reach it.
    #[arg(long, env = "STRAIT_PROXY_SKIP_INBOUND_PORTS", default_value = "")]
    pub skip_inbound_ports: PortSet,
    /// Destination ports the app reaches directly, not through the proxy.
    #[arg(long, env = "STRAIT_PROXY_SKIP_OUTBOUND_PORTS", default_value = "")]
    pub skip_outbound_ports: PortSet,
    /// Destination networks the app reaches directly (comma-separated IPv4 or
    /// IPv6 CIDRs).
    #[arg(
        long,
        env = "STRAIT_PROXY_SKIP_OUTBOUND_CIDRS",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub skip_outbound_cidrs: Vec<IpNet>,
    /// Whether the app's IPv6 connections go to the proxy (on `[::1]`) as its
    /// IPv4 ones do. Off for a proxy too old to listen on IPv6 loopback
    /// (the injector turns it off for a pod that names its own proxy
    /// image): then they leave the pod unmeshed, as they did with it.
    #[arg(long, env = "STRAIT_PROXY_IPV6_OUTBOUND", default_value_t = true, action = clap::ArgAction::Set)]
    pub ipv6_outbound: bool,
    /// Which iptables backend writes the rules: nft (the default on current
    /// distributions and nodes) or legacy (older nodes whose kube-proxy uses it).
    #[arg(long, env = "STRAIT_PROXY_IPTABLES_MODE", value_enum, default_value_t = IptablesMode::Nft)]
    pub iptables_mode: IptablesMode,
    /// Print the rules for a fresh pod and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IptablesMode {
    Nft,
    Legacy,
}

impl IptablesMode {
    fn other(self) -> Self {
        match self {
            IptablesMode::Nft => IptablesMode::Legacy,
            IptablesMode::Legacy => IptablesMode::Nft,
        }
    }

    fn command(self, family: &str, verb: &str) -> String {
        match self {
            IptablesMode::Nft => format!("{family}-nft-{verb}"),
            IptablesMode::Legacy => format!("{family}-legacy-{verb}"),
        }
    }
}

/// Whether this network namespace has IPv6 at all (a kernel booted without
/// it has no ip6tables tables to write).
fn has_ipv6() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

/// Whether `/proc/net/if_inet6` (`addr ifindex prefix scope flags name` per
/// line) lists an address of global scope on an interface other than
/// loopback: one other pods could reach the app at, around the proxy.
fn has_global_ipv6(if_inet6: &str) -> bool {
    if_inet6.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        matches!(f.as_slice(), [_, _, _, "00", _, name] if *name != "lo")
    })
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot run {0}: {1} (is iptables installed?)")]
    Spawn(String, std::io::Error),
    #[error("{0} failed ({1}): {2}{hint}", hint = module_hint(.2))]
    Failed(String, std::process::ExitStatus, String),
    #[error(
        "--inbound-port and --outbound-port are both {0}: the pod's inbound connections would reach the outbound listener"
    )]
    SamePorts(u16),
    #[error(
        "the pod's network already has another mesh's interception rules (chain {0}): take the pod or its namespace out of that mesh first (for Istio's ambient mesh, its istio.io/dataplane-mode label)"
    )]
    OtherMesh(String),
}

impl InitArgs {
    pub fn plan(&self) -> Plan {
        let mut skip_in = self.skip_inbound_ports.clone();
        skip_in.insert(defaults::ADMIN_PORT);
        Plan {
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            proxy_uid: self.proxy_uid,
            skip_inbound_ports: skip_in,
            skip_outbound_ports: self.skip_outbound_ports.clone(),
            skip_outbound_cidrs: self.skip_outbound_cidrs.clone(),
            ipv6_outbound: self.ipv6_outbound,
        }
    }
}

/// Applies the rules (or prints them with `--dry-run`), returning what was
/// applied: the IPv4 rules, then the IPv6 ones where the pod has IPv6.
pub fn run(args: &InitArgs) -> Result<String, InitError> {
    if args.inbound_port == args.outbound_port {
        return Err(InitError::SamePorts(args.inbound_port));
    }
    let plan = args.plan();
    if args.dry_run {
        let v4 = plan.restore_input(Installed::default());
        let v6 = plan.restore_input_v6(Installed::default());
        return Ok(format!("# iptables\n{v4}# ip6tables\n{v6}"));
    }
    let mode = args.iptables_mode;
    let v4 = restored(mode, "iptables", "nat", |save| {
        refuse_other_mesh(save)?;
        refuse_other_mesh_in_other_backend(mode, "iptables")?;
        Ok(plan.restore_input(Installed::from_save(save)))
    })?;
    let mut applied = format!("# iptables\n{v4}");
    if has_ipv6() {
        let v6 = restored(mode, "ip6tables", "nat", |save| {
            refuse_other_mesh(save)?;
            refuse_other_mesh_in_other_backend(mode, "ip6tables")?;
            Ok(plan.restore_input_v6(Installed::from_save(save)))
        });
        match v6 {
            Ok(v6) => applied.push_str(&format!("# ip6tables\n{v6}")),
            // The IPv6 rules only keep callers from reaching the app over
            // IPv6 around the proxy. On nodes that cannot load them (no
            // ip6table_nat module) a pod with no IPv6 address of its own
            // starts without them rather than never.
            Err(e)
                if !std::fs::read_to_string("/proc/net/if_inet6")
                    .is_ok_and(|t| has_global_ipv6(&t)) =>
            {
                // Its link-local addresses are still reachable from its link
                // (a bridge CNI's neighbours): refused in the filter table.
                let refused = restored(mode, "ip6tables", "filter", |save| {
                    Ok(rules::refuse_v6_input(rules::input_jumps(save)))
                });
                match refused {
                    Ok(rules) => {
                        eprintln!(
                            "strait-proxy init: the IPv6 nat rules were not applied ({e}); the pod has no IPv6 address but link-local ones, and other hosts' IPv6 connections to it are refused"
                        );
                        applied.push_str(&format!("# ip6tables (nat not applied)\n{rules}"));
                    }
                    Err(f) => {
                        eprintln!(
                            "strait-proxy init: no IPv6 rules were applied, and the pod has no IPv6 address but link-local ones: {e}; {f}"
                        );
                        applied.push_str(
                            "# ip6tables: not applied (no IPv6 address but link-local)\n",
                        );
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(applied)
}

/// Rules `make` writes from what `family`'s `table` holds now, applied;
/// `--noflush`: other tables and chains (a CNI's, kube-proxy's) stay as they
/// are.
fn restored(
    mode: IptablesMode,
    family: &str,
    table: &str,
    make: impl FnOnce(&str) -> Result<String, InitError>,
) -> Result<String, InitError> {
    let save = iptables(mode.command(family, "save"), &["-t", table], None)?;
    let rules = make(&save)?;
    iptables(
        mode.command(family, "restore"),
        &["--noflush", "--wait"],
        Some(&rules),
    )?;
    Ok(rules)
}

fn refuse_other_mesh(save: &str) -> Result<(), InitError> {
    match rules::other_mesh_chain(save) {
        Some(chain) => Err(InitError::OtherMesh(chain.to_string())),
        None => Ok(()),
    }
}

/// The kernel runs both backends' rules: another mesh's written with the
/// other one (Istio takes legacy where the node has no nft rules) redirects
/// as ours do. Listed without `-t`, which lists the tables there are and
/// creates none; a backend whose tool is missing or fails has no rules to see.
fn refuse_other_mesh_in_other_backend(mode: IptablesMode, family: &str) -> Result<(), InitError> {
    match iptables(mode.other().command(family, "save"), &[], None) {
        Ok(save) => refuse_other_mesh(&save),
        Err(_) => Ok(()),
    }
}

/// What to do where the tool says the kernel lacks what the rules use: the
/// tool names neither the module nor the way out, and every meshed pod of
/// the node then waits in its init container.
fn module_hint(stderr: &str) -> &'static str {
    const SAID: [&str; 5] = [
        "kernel module",
        "insmod",
        "can't initialize iptables table",
        "Could not fetch rule set generation id",
        "not supported",
    ];
    // Without NET_ADMIN the tools say so too ("Permission denied (you must
    // be root)"), with some of the same words.
    if SAID.iter().any(|s| stderr.contains(s)) && !stderr.contains("Permission denied") {
        " (the node's kernel cannot load what the rules use: the nat table (iptable_nat, \
         ip6table_nat), the owner match and REDIRECT (xt_owner, xt_REDIRECT), and for \
         --iptables-mode=nft nf_tables, nft_chain_nat and nft_compat; load them on the node \
         (/etc/modules-load.d, as SELinux may keep containers from loading them), or install \
         with the other --proxy-iptables-mode)"
    } else {
        ""
    }
}

fn iptables(cmd: String, args: &[&str], stdin: Option<&str>) -> Result<String, InitError> {
    let mut child = Command::new(&cmd)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| InitError::Spawn(cmd.clone(), e))?;
    // A tool that stops reading (it refused an early line) closes the pipe:
    // its status and stderr, not the broken pipe, say why.
    let written = match (stdin, child.stdin.take()) {
        (Some(input), Some(mut pipe)) => pipe.write_all(input.as_bytes()),
        _ => Ok(()),
    };
    let out = child
        .wait_with_output()
        .map_err(|e| InitError::Spawn(cmd.clone(), e))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(InitError::Failed(cmd, out.status, err));
    }
    written.map_err(|e| InitError::Spawn(cmd.clone(), e))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_global_address_off_loopback_is_the_pods_ipv6() {
        let link_local = "00000000000000000000000000000001 01 80 10 80       lo\nfe8000000000000000fc00fffe000001 04 40 20 80     eth0\n";
        assert!(!has_global_ipv6(link_local));
        assert!(!has_global_ipv6(""));
        let global = format!("{link_local}fd000000000000000000000000000002 04 40 00 82     eth0\n");
        assert!(has_global_ipv6(&global));
    }

    /// A tool that refuses its input early and stops reading is reported by
    /// what it said, not as a broken pipe.
    #[test]
    fn a_tool_that_stops_reading_is_reported_by_what_it_said() {
        use std::os::unix::fs::PermissionsExt as _;
        let tool = std::env::temp_dir().join(format!("strait-refusing-{}", std::process::id()));
        std::fs::write(&tool, "#!/bin/sh\necho 'line 2 failed' >&2\nexit 2\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let input = "-A X -j ACCEPT\n".repeat(16 * 1024);
        let e = iptables(tool.display().to_string(), &[], Some(&input)).unwrap_err();
        assert!(
            matches!(&e, InitError::Failed(_, _, err) if err.contains("line 2 failed")),
            "{e}"
        );
        let _ = std::fs::remove_file(&tool);
    }

    /// A node whose kernel cannot load what the rules use is named as such,
    /// with the modules and the way out; other failures are as the tool said.
    #[test]
    fn a_missing_kernel_module_is_named_with_the_way_out() {
        let failed = |err: &str| {
            InitError::Failed(
                "iptables-nft-restore".into(),
                std::os::unix::process::ExitStatusExt::from_raw(1 << 8),
                err.into(),
            )
            .to_string()
        };
        for said in [
            "Warning: Extension owner revision 0 not supported, missing kernel module?",
            "iptables-restore v1.8.9 (legacy): can't initialize iptables table `nat': Table does not exist (do you need to insmod?)",
        ] {
            let e = failed(said);
            assert!(e.contains(said) && e.contains("xt_owner"), "{e}");
            assert!(e.contains("--proxy-iptables-mode"), "{e}");
        }
        for other in [
            "line 2 failed",
            "Could not fetch rule set generation id: Permission denied (you must be root)",
        ] {
            let e = failed(other);
            assert!(!e.contains("xt_owner"), "{e}");
        }
    }

    /// Every command `init` may run is in the proxy's image: a node with IPv6
    /// (most, whatever the cluster's family) runs the ip6tables ones too.
    #[test]
    fn the_image_carries_every_command_init_runs() {
        let dockerfile = include_str!("../../../deploy/docker/strait-proxy.Dockerfile");
        for mode in [IptablesMode::Nft, IptablesMode::Legacy] {
            for family in ["iptables", "ip6tables"] {
                for verb in ["save", "restore"] {
                    let cmd = mode.command(family, verb);
                    assert!(
                        dockerfile.contains(&format!("/usr/sbin/{cmd} ")),
                        "{cmd} is not copied into the image"
                    );
                }
            }
        }
    }
}
