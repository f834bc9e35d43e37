//! The redirection rules `ward-proxy init` installs, as a pure function from the options to
//! an nftables script. One table, `inet ward` (IPv4 and IPv6 alike), replaced atomically:
//! the script creates the table if missing, deletes it and defines it again in one
//! transaction, so running `init` twice changes nothing and a changed option replaces the
//! old rules instead of adding to them.

use std::fmt::Write as _;

use ward_spiffe::cidr::Cidr;

/// The nftables table Ward owns.
pub const TABLE: &str = "ward";

/// What to capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The proxy's inbound capture port.
    pub inbound_port: u16,
    /// The proxy's outbound capture port.
    pub outbound_port: u16,
    /// The proxy's uid: its own connections are never captured.
    pub proxy_uid: u32,
    /// Capture inbound connections.
    pub inbound: bool,
    /// Capture outbound connections.
    pub outbound: bool,
    /// Inbound destination ports left alone (the proxy's admin port is always among them).
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations left alone.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// The proxy's admin port (health probes and metrics reach it directly).
    pub admin_port: u16,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            inbound_port: 15006,
            outbound_port: 15001,
            proxy_uid: 1337,
            inbound: true,
            outbound: true,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            admin_port: 15020,
        }
    }
}

fn set(ports: impl IntoIterator<Item = u16>) -> String {
    let mut v: Vec<u16> = ports.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    let items: Vec<String> = v.iter().map(u16::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

/// The nftables script that installs the rules.
pub fn install_script(o: &Options) -> String {
    let mut s = remove_script();
    let _ = writeln!(s, "table inet {TABLE} {{");
    if o.inbound {
        // Everything that arrives for the pod, except what is excluded, goes to the proxy —
        // and only what is addressed to the pod itself: a packet routed here for another
        // address must not turn the proxy into a relay. Locally generated connections are not
        // new when their packets loop back through prerouting (nat sees a connection's first
        // packet only), so the proxy's own connections to the application are not captured.
        let skip = set(o
            .exclude_inbound_ports
            .iter()
            .copied()
            .chain([o.admin_port, o.inbound_port]));
        let _ = writeln!(
            s,
            "  chain inbound {{\n    type nat hook prerouting priority -100; policy accept;\n    \
             fib daddr type != local return\n    \
             tcp dport {skip} return\n    meta l4proto tcp redirect to :{}\n  }}",
            o.inbound_port
        );
    }
    if o.outbound {
        let mut rules = format!(
            "    meta skuid {} return\n    oifname \"lo\" return\n",
            o.proxy_uid
        );
        let v4: Vec<String> = o
            .exclude_outbound_cidrs
            .iter()
            .filter(|c| !c.is_ipv6())
            .map(ToString::to_string)
            .collect();
        let v6: Vec<String> = o
            .exclude_outbound_cidrs
            .iter()
            .filter(|c| c.is_ipv6())
            .map(ToString::to_string)
            .collect();
        if !v4.is_empty() {
            let _ = writeln!(rules, "    ip daddr {{ {} }} return", v4.join(", "));
        }
        if !v6.is_empty() {
            let _ = writeln!(rules, "    ip6 daddr {{ {} }} return", v6.join(", "));
        }
        if !o.exclude_outbound_ports.is_empty() {
            let _ = writeln!(
                rules,
                "    tcp dport {} return",
                set(o.exclude_outbound_ports.iter().copied())
            );
        }
        let _ = writeln!(
            s,
            "  chain outbound {{\n    type nat hook output priority -100; policy accept;\n{rules}    \
             meta l4proto tcp redirect to :{}\n  }}",
            o.outbound_port
        );
    }
    s.push_str("}\n");
    s
}

/// The nftables script that removes the rules (a no-op when there are none).
pub fn remove_script() -> String {
    format!("add table inet {TABLE}\ndelete table inet {TABLE}\n")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn default_rules() {
        let s = install_script(&Options::default());
        assert_eq!(
            s,
            "add table inet ward\ndelete table inet ward\ntable inet ward {\n\
             \x20 chain inbound {\n    type nat hook prerouting priority -100; policy accept;\n\
             \x20   fib daddr type != local return\n\
             \x20   tcp dport { 15006, 15020 } return\n    meta l4proto tcp redirect to :15006\n  }\n\
             \x20 chain outbound {\n    type nat hook output priority -100; policy accept;\n\
             \x20   meta skuid 1337 return\n    oifname \"lo\" return\n\
             \x20   meta l4proto tcp redirect to :15001\n  }\n}\n"
        );
    }

    #[test]
    fn exclusions_and_directions() {
        let o = Options {
            exclude_inbound_ports: vec![9090, 22, 9090],
            exclude_outbound_ports: vec![53, 443],
            exclude_outbound_cidrs: vec![
                "169.254.0.0/16".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ],
            proxy_uid: 2102,
            ..Options::default()
        };
        let s = install_script(&o);
        assert!(
            s.contains("tcp dport { 22, 9090, 15006, 15020 } return"),
            "{s}"
        );
        assert!(s.contains("ip daddr { 169.254.0.0/16 } return"), "{s}");
        assert!(s.contains("ip6 daddr { fd00::/8 } return"), "{s}");
        assert!(s.contains("tcp dport { 53, 443 } return"), "{s}");
        assert!(s.contains("meta skuid 2102 return"), "{s}");
        let only_in = install_script(&Options {
            outbound: false,
            ..Options::default()
        });
        assert!(only_in.contains("chain inbound") && !only_in.contains("chain outbound"));
        let only_out = install_script(&Options {
            inbound: false,
            ..Options::default()
        });
        assert!(!only_out.contains("chain inbound") && only_out.contains("chain outbound"));
        // Installing always starts by replacing the table, so twice is once.
        assert!(s.starts_with(&remove_script()));
    }
}
