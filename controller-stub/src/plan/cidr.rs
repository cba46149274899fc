//! Subnet CIDRs of a DR plan (`"cidr": "192.168.15.0/24"`), IPv4 and IPv6,
//! with the standard library's address types only.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A network in CIDR notation: an address whose host bits are all zero and
/// a prefix length (0 to 32 for IPv4, 0 to 128 for IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// Why a text is not a CIDR.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// There is no `/` between address and prefix length.
    #[error("no prefix length (expected address/prefix, e.g. 192.168.15.0/24)")]
    MissingPrefix,
    /// The part before `/` is not an IPv4 or IPv6 address.
    #[error("`{0}` is not an IP address")]
    BadAddress(String),
    /// The part after `/` is not a decimal number.
    #[error("prefix length `{0}` is not a decimal number")]
    BadPrefix(String),
    /// The prefix length is larger than the address has bits.
    #[error("prefix length {prefix} is larger than {max}")]
    PrefixTooLong {
        /// The prefix length given.
        prefix: u16,
        /// 32 for IPv4, 128 for IPv6.
        max: u8,
    },
    /// The address has bits set past the prefix, which usually means a
    /// host address was written where the network was meant.
    #[error("host bits are set past the prefix (the network is {network})")]
    HostBitsSet {
        /// The network the address lies in.
        network: Cidr,
    },
}

impl Cidr {
    /// The network address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in this network. An address of the other family
    /// never does.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = mask_v4(self.prefix);
                u32::from(ip) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = mask_v6(self.prefix);
                u128::from(ip) & mask == u128::from(net)
            }
            _ => false,
        }
    }
}

/// The netmask of an IPv4 prefix (`prefix` <= 32).
fn mask_v4(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

/// The netmask of an IPv6 prefix (`prefix` <= 128).
fn mask_v6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// Parses `address/prefix`. The prefix is 1 to 3 decimal digits; the
    /// address is what `std::net::IpAddr` accepts; host bits must be zero.
    fn from_str(text: &str) -> Result<Cidr, CidrError> {
        let (addr, prefix) = text.split_once('/').ok_or(CidrError::MissingPrefix)?;
        let network =
            IpAddr::from_str(addr).map_err(|_| CidrError::BadAddress(addr.to_string()))?;
        // Digits only: `u16::from_str` would also take a leading `+`.
        if prefix.is_empty() || prefix.len() > 3 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CidrError::BadPrefix(prefix.to_string()));
        }
        let prefix: u16 = prefix
            .parse()
            .map_err(|_| CidrError::BadPrefix(prefix.to_string()))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match u8::try_from(prefix) {
            Ok(p) if p <= max => p,
            _ => return Err(CidrError::PrefixTooLong { prefix, max }),
        };
        let masked = match network {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) & mask_v4(prefix)).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & mask_v6(prefix)).into()),
        };
        let cidr = Cidr {
            network: masked,
            prefix,
        };
        if masked != network {
            return Err(CidrError::HostBitsSet { network: cidr });
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_networks_contain_their_hosts_only() {
        let c: Cidr = "192.168.15.0/24".parse().unwrap();
        assert_eq!(c.prefix(), 24);
        assert_eq!(c.to_string(), "192.168.15.0/24");
        assert!(c.contains(ip("192.168.15.0")));
        assert!(c.contains(ip("192.168.15.255")));
        assert!(!c.contains(ip("192.168.16.1")));
        assert!(!c.contains(ip("192.168.14.255")));
        let c: Cidr = "172.22.0.0/16".parse().unwrap();
        assert!(c.contains(ip("172.22.8.249")));
        assert!(!c.contains(ip("172.23.0.1")));
    }

    #[test]
    fn ipv6_networks_contain_their_hosts_only() {
        let c: Cidr = "2001:db8:15::/48".parse().unwrap();
        assert!(c.contains(ip("2001:db8:15::10")));
        assert!(c.contains(ip("2001:db8:15:ffff:ffff:ffff:ffff:ffff")));
        assert!(!c.contains(ip("2001:db8:16::1")));
        assert_eq!(c.to_string(), "2001:db8:15::/48");
    }

    #[test]
    fn families_never_mix() {
        let v4: Cidr = "0.0.0.0/0".parse().unwrap();
        let v6: Cidr = "::/0".parse().unwrap();
        assert!(v4.contains(ip("10.1.2.3")));
        assert!(!v4.contains(ip("::1")));
        assert!(!v4.contains(ip("::ffff:10.1.2.3")));
        assert!(v6.contains(ip("::1")));
        assert!(!v6.contains(ip("10.1.2.3")));
    }

    #[test]
    fn full_length_prefixes_are_single_hosts() {
        let c: Cidr = "10.0.0.7/32".parse().unwrap();
        assert!(c.contains(ip("10.0.0.7")));
        assert!(!c.contains(ip("10.0.0.6")));
        let c: Cidr = "fe80::7/128".parse().unwrap();
        assert!(c.contains(ip("fe80::7")));
        assert!(!c.contains(ip("fe80::6")));
    }

    #[test]
    fn malformed_cidrs_say_why() {
        let err = |s: &str| s.parse::<Cidr>().unwrap_err();
        assert_eq!(err("192.168.15.0"), CidrError::MissingPrefix);
        assert_eq!(
            err("192.168.15/24"),
            CidrError::BadAddress("192.168.15".into())
        );
        assert_eq!(err("10.0.0.0/"), CidrError::BadPrefix(String::new()));
        assert_eq!(err("10.0.0.0/+8"), CidrError::BadPrefix("+8".into()));
        assert_eq!(err("10.0.0.0/ 8"), CidrError::BadPrefix(" 8".into()));
        assert_eq!(err("10.0.0.0/1000"), CidrError::BadPrefix("1000".into()));
        assert_eq!(
            err("10.0.0.0/33"),
            CidrError::PrefixTooLong {
                prefix: 33,
                max: 32
            }
        );
        assert_eq!(
            err("::/129"),
            CidrError::PrefixTooLong {
                prefix: 129,
                max: 128
            }
        );
        assert_eq!(
            err("::/999"),
            CidrError::PrefixTooLong {
                prefix: 999,
                max: 128
            }
        );
        match err("192.168.15.1/24") {
            CidrError::HostBitsSet { network } => {
                assert_eq!(network.to_string(), "192.168.15.0/24")
            }
            other => panic!("{other:?}"),
        }
        match err("2001:db8::1/64") {
            CidrError::HostBitsSet { network } => assert_eq!(network.to_string(), "2001:db8::/64"),
            other => panic!("{other:?}"),
        }
    }
}
