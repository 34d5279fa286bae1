//! What sluice-cni needs from `prevResult`: the pod's addresses and the host side of its veth.
//!
//! The result formats of CNI 0.3.0 through 1.1.0 agree on the parts read here: `interfaces[]`
//! with `name` and `sandbox` (absent or empty on the host), and `ips[]` with `address` (a CIDR)
//! and an optional `interface` index (0.3.x/0.4.x also carry `version`, ignored). Everything else
//! is passed through untouched by the caller, which prints the original JSON value.
//!
//! The host veth rule: among the interfaces without a sandbox, the one listed closest before the
//! pod's interface (the sandbox interface named CNI_IFNAME, else the first sandbox interface). The
//! bridge plugin, which flannel delegates to, lists `[bridge, host veth, pod interface]`, so the
//! bridge (listed first) is not picked while a veth follows it. With only one host interface,
//! that one; with no pod interface listed, the last host interface.

use std::net::IpAddr;

use serde::Deserialize;
use serde_json::Value;

use crate::cni::CniError;
use crate::protocol::codes;

/// The pod's side of things, from prevResult.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    pub ips: Vec<IpAddr>,
    pub host_veth: String,
}

#[derive(Deserialize)]
struct Result {
    #[serde(default)]
    interfaces: Vec<Interface>,
    #[serde(default)]
    ips: Vec<IpConfig>,
}

#[derive(Deserialize)]
struct Interface {
    name: String,
    #[serde(default)]
    sandbox: Option<String>,
}

impl Interface {
    fn in_sandbox(&self) -> bool {
        self.sandbox.as_deref().is_some_and(|s| !s.is_empty())
    }
}

#[derive(Deserialize)]
struct IpConfig {
    address: String,
    #[serde(default)]
    interface: Option<usize>,
}

fn invalid(details: String) -> CniError {
    CniError::new(codes::INVALID_CONFIG, "unusable prevResult", details)
}

/// Read the pod's IPs and host veth out of `prev` for the attachment's `ifname`.
pub fn pod_network(prev: &Value, ifname: &str) -> std::result::Result<PodNetwork, CniError> {
    let result: Result = serde_json::from_value(prev.clone())
        .map_err(|e| invalid(format!("prevResult does not look like a CNI result: {e}")))?;
    let ifaces = &result.interfaces;

    let pod_iface = ifaces
        .iter()
        .position(|i| i.in_sandbox() && i.name == ifname)
        .or_else(|| ifaces.iter().position(Interface::in_sandbox));

    let mut ips = Vec::new();
    for (n, ip) in result.ips.iter().enumerate() {
        let wanted = match (ip.interface, pod_iface) {
            (None, _) => true,
            (Some(i), Some(pod)) => i == pod,
            (Some(i), None) => ifaces.get(i).is_none_or(Interface::in_sandbox),
        };
        if let Some(i) = ip.interface {
            if i >= ifaces.len() {
                return Err(invalid(format!(
                    "ips[{n}].interface is {i} but prevResult lists {} interfaces",
                    ifaces.len()
                )));
            }
        }
        if !wanted {
            continue;
        }
        let addr = ip
            .address
            .split_once('/')
            .map_or(ip.address.as_str(), |(a, _)| a);
        let addr: IpAddr = addr.parse().map_err(|_| {
            invalid(format!(
                "ips[{n}].address {:?} is not an address in CIDR notation",
                ip.address
            ))
        })?;
        if !ips.contains(&addr) {
            ips.push(addr);
        }
    }
    if ips.is_empty() {
        return Err(invalid(format!(
            "prevResult has no IP address for the pod's interface {ifname:?}; sluice-cni must be \
             chained after the plugin that assigns it (flannel)"
        )));
    }

    let host: Vec<usize> = (0..ifaces.len())
        .filter(|&i| !ifaces[i].in_sandbox())
        .collect();
    let veth = match (host.as_slice(), pod_iface) {
        ([], _) => None,
        ([only], _) => Some(*only),
        (_, Some(pod)) => host.iter().rev().find(|&&i| i < pod).copied(),
        (_, None) => host.last().copied(),
    };
    let Some(veth) = veth else {
        let names: Vec<&str> = ifaces.iter().map(|i| i.name.as_str()).collect();
        return Err(invalid(format!(
            "prevResult lists no host-side interface before the pod's (interfaces: {names:?}); \
             sluice-cni needs the host end of the pod's veth, as flannel's bridge plugin reports it"
        )));
    };

    Ok(PodNetwork {
        ips,
        host_veth: ifaces[veth].name.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What the flannel chain (flannel → bridge → host-local, then portmap) returned for real,
    /// with `e2e/cni-plugins` (see cni-chain/README.md).
    pub(crate) fn flannel_0_3_1() -> Value {
        json!({
            "cniVersion": "0.3.1",
            "interfaces": [
                {"name": "cni0", "mac": "aa:27:4c:fe:9b:70"},
                {"name": "veth5d6ee293", "mac": "da:4e:72:e7:63:77"},
                {"name": "eth0", "mac": "46:35:b6:39:78:a7", "sandbox": "/run/netns/sluicecni29533-pod"}
            ],
            "ips": [{"version": "4", "interface": 2, "address": "10.244.1.2/24", "gateway": "10.244.1.1"}],
            "routes": [{"dst": "10.244.0.0/16"}, {"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
            "dns": {}
        })
    }

    fn net(ips: &[&str], veth: &str) -> PodNetwork {
        PodNetwork {
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            host_veth: veth.into(),
        }
    }

    #[test]
    fn flannel_chain_result() {
        assert_eq!(
            pod_network(&flannel_0_3_1(), "eth0").unwrap(),
            net(&["10.244.1.2"], "veth5d6ee293")
        );
    }

    #[test]
    fn every_version_shape() {
        // 0.3.0/0.3.1/0.4.0: ips carry "version"; 1.0.0/1.1.0 dropped it and added mtu,
        // socketPath, pciID, route fields. Dual stack, IPv6 first on purpose.
        for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
            let old = version.starts_with("0.");
            let mut v6 = json!({"interface": 2, "address": "fd00:10:244:1::5/64", "gateway": "fd00:10:244:1::1"});
            let mut v4 =
                json!({"interface": 2, "address": "10.244.1.5/24", "gateway": "10.244.1.1"});
            if old {
                v6["version"] = json!("6");
                v4["version"] = json!("4");
            }
            let mut prev = json!({
                "cniVersion": version,
                "interfaces": [
                    {"name": "cni0", "mac": "aa:bb:cc:00:00:01"},
                    {"name": "vethab12", "mac": "aa:bb:cc:00:00:02", "sandbox": ""},
                    {"name": "eth0", "mac": "aa:bb:cc:00:00:03", "sandbox": "/var/run/netns/cni-1"}
                ],
                "ips": [v6, v4],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dns": {}
            });
            if !old {
                prev["interfaces"][2]["mtu"] = json!(1450);
                prev["interfaces"][2]["socketPath"] = json!("");
                prev["routes"][0]["priority"] = json!(10);
            }
            assert_eq!(
                pod_network(&prev, "eth0").unwrap(),
                net(&["fd00:10:244:1::5", "10.244.1.5"], "vethab12"),
                "{version}"
            );
        }
    }

    #[test]
    fn veth_selection() {
        let ifs = |list: Value| json!({"interfaces": list, "ips": [{"address": "10.0.0.2/24"}]});
        let cases = [
            // ptp-like: only the host veth
            (
                json!([{"name":"veth1"},{"name":"eth0","sandbox":"/n"}]),
                "veth1",
            ),
            // bridge listed first, veth right before the pod interface
            (
                json!([{"name":"cni0"},{"name":"veth1"},{"name":"eth0","sandbox":"/n"}]),
                "veth1",
            ),
            // two attachments' worth: pick the veth before *our* ifname
            (
                json!([{"name":"cni0"},{"name":"vethA"},{"name":"net1","sandbox":"/n"},{"name":"vethB"},{"name":"eth0","sandbox":"/n"}]),
                "vethB",
            ),
            // no pod interface listed: the last host interface
            (json!([{"name":"cni0"},{"name":"veth1"}]), "veth1"),
        ];
        for (list, want) in cases {
            assert_eq!(
                pod_network(&ifs(list.clone()), "eth0").unwrap().host_veth,
                want,
                "{list}"
            );
        }
        for bad in [
            json!([]),
            json!([{"name":"eth0","sandbox":"/n"}]),
            json!([{"name":"eth0","sandbox":"/n"},{"name":"cni0"},{"name":"veth1"}]),
        ] {
            let e = pod_network(&ifs(bad.clone()), "eth0").unwrap_err();
            assert_eq!(e.code, 7);
            assert!(e.details.contains("host-side interface"), "{bad}: {e}");
        }
    }

    #[test]
    fn only_the_pods_addresses() {
        let prev = json!({
            "interfaces": [{"name":"cni0"},{"name":"veth1"},{"name":"eth0","sandbox":"/n"},{"name":"net1","sandbox":"/n"}],
            "ips": [
                {"interface": 0, "address": "10.244.1.1/24"},
                {"interface": 2, "address": "10.244.1.7/24"},
                {"interface": 3, "address": "192.168.5.5/24"},
                {"address": "10.244.1.7/32"}
            ]
        });
        assert_eq!(
            pod_network(&prev, "eth0").unwrap(),
            net(&["10.244.1.7"], "veth1")
        );
    }

    #[test]
    fn unusable_results() {
        let cases = [
            (
                json!({"interfaces":[{"name":"veth1"}],"ips":[]}),
                "no IP address",
            ),
            (json!({"interfaces":[{"name":"veth1"}]}), "no IP address"),
            (
                json!({"interfaces":[{"name":"veth1"}],"ips":[{"address":"banana"}]}),
                "banana",
            ),
            (
                json!({"interfaces":[{"name":"veth1"}],"ips":[{"address":"10.0.0.1/8","interface":4}]}),
                "ips[0].interface is 4",
            ),
            (
                json!({"interfaces":"no","ips":[]}),
                "does not look like a CNI result",
            ),
            (json!({"ip4":{"ip":"10.0.0.2/24"}}), "no IP address"),
        ];
        for (prev, needle) in cases {
            let e = pod_network(&prev, "eth0").unwrap_err();
            assert_eq!(e.code, 7);
            assert!(e.details.contains(needle), "{prev}: {e}");
        }
    }
}
