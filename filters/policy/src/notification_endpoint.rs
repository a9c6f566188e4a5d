//! Where a subscription sends notifications, or where a registration sends forwarded requests:
//! the broker connects there, from inside the network (server-side request forgery). An
//! endpoint is refused (403) when it names the broker's own host or the cloud's metadata
//! service, in any spelling the broker's HTTP client would accept:
//!
//! * loopback (`127.0.0.0/8`, `::1`), unspecified / "this host" (`0.0.0.0/8`, `::`),
//!   link-local (`169.254.0.0/16` — which holds AWS, GCP, Azure and OpenStack metadata at
//!   `169.254.169.254` and ECS at `169.254.170.2` — and `fe80::/10`), the Alibaba metadata
//!   address `100.100.100.200`, AWS's IPv6 metadata `fd00:ec2::254`, and the broadcast address;
//! * the same addresses written as IPv4-mapped, IPv4-compatible or NAT64 (`64:ff9b::/96`)
//!   IPv6, or as decimal, octal or hex IPv4 (`2130706433`, `0177.1`, `0x7f.1`): the `url`
//!   crate's WHATWG host parser reads them as curl does;
//! * the names `localhost` (and any `*.localhost`, RFC 6761), `ip6-localhost`,
//!   `ip6-loopback`, `localhost.localdomain` and the metadata names `metadata`,
//!   `metadata.google.internal`, `metadata.goog`, `instance-data`, with or without a
//!   trailing dot, in any case.
//!
//! Also refused: a scheme other than `http`, `https` (Orion's HTTP notifications, NGSI-LD
//! endpoints, FogFlow references) and `mqtt`, `mqtts` (Orion's and Orion-LD's MQTT
//! notifications); an authority (user, host, port) holding an Orion macro `${...}` (the
//! broker would fill it in from entity data, so the host is not known here); an endpoint that
//! is not a URL at all (400).
//!
//! Private networks (RFC 1918, `fc00::/7`) are allowed: notification receivers usually live
//! there. Other host names are not resolved (the filter has no DNS); a name that resolves to a
//! refused address is the network's to stop. An operator allows a refused endpoint with an
//! allow rule whose `endpoint_prefix` names it, or with `allow_local_notification_endpoints`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use url::{Host, Url};

use crate::decision::DenyReason;

/// Schemes a broker notifies or forwards to.
const SCHEMES: [&str; 4] = ["http", "https", "mqtt", "mqtts"];

/// Host names that always mean the broker's own host or the metadata service (compared
/// lowercase, without a trailing dot).
const LOCAL_NAMES: [&str; 8] = [
    "localhost",
    "ip6-localhost",
    "ip6-loopback",
    "localhost.localdomain",
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "instance-data",
];

const ALIBABA_METADATA: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 200);
const AWS_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// Checks one endpoint; the error is the 400 or 403 to answer.
pub fn check(endpoint: &str) -> Result<(), DenyReason> {
    let forbidden = |why: String| {
        Err(DenyReason::Forbidden(format!(
            "notification endpoint {endpoint:?} {why}"
        )))
    };
    if authority(endpoint).contains("${") {
        return forbidden("has a templated host (${...}): the broker would choose it".into());
    }
    let url = Url::parse(endpoint).map_err(|e| {
        DenyReason::BadRequest(format!(
            "notification endpoint {endpoint:?} is not a URL: {e}"
        ))
    })?;
    if !SCHEMES.contains(&url.scheme()) {
        return forbidden(format!(
            "has scheme {:?}; allowed: {}",
            url.scheme(),
            SCHEMES.join(", ")
        ));
    }
    let Some(raw_host) = url.host_str() else {
        return forbidden("has no host".into());
    };
    // `mqtt` URLs are not "special" to the WHATWG parser, which then keeps their host as
    // written: parse it again as an http host so `0x7f.1` is 127.0.0.1 for them too.
    let host = Host::parse(raw_host).map_err(|e| {
        DenyReason::BadRequest(format!(
            "notification endpoint {endpoint:?} has an invalid host: {e}"
        ))
    })?;
    let refused = match &host {
        Host::Domain(name) => local_name(name),
        Host::Ipv4(ip) => local_ip(IpAddr::V4(*ip)),
        Host::Ipv6(ip) => local_ip(IpAddr::V6(*ip)),
    };
    match refused {
        Some(what) => forbidden(format!(
            "is {what}: the broker would connect to itself or to the metadata service"
        )),
        None => Ok(()),
    }
}

/// The text between `scheme://` and the path, query or fragment (the whole string when it has
/// no `://`).
fn authority(endpoint: &str) -> &str {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    rest.split(['/', '?', '#']).next().unwrap_or(rest)
}

fn local_name(name: &str) -> Option<&'static str> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if LOCAL_NAMES.contains(&name.as_str()) || name.ends_with(".localhost") {
        return Some("a local or metadata host name");
    }
    // A name that is an address once its trailing dot is gone (`127.0.0.1.`).
    match Host::parse(&name) {
        Ok(Host::Ipv4(ip)) => local_ip(IpAddr::V4(ip)),
        _ => None,
    }
}

fn local_ip(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => local_v4(v4),
        IpAddr::V6(v6) => {
            if v6.is_loopback() {
                return Some("a loopback address");
            }
            if v6.is_unspecified() {
                return Some("the unspecified address");
            }
            if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                return Some("a link-local address");
            }
            if v6 == AWS_METADATA_V6 {
                return Some("a cloud metadata address");
            }
            // An IPv4 address inside IPv6: mapped (`::ffff:a.b.c.d`), compatible
            // (`::a.b.c.d`), or NAT64 (`64:ff9b::a.b.c.d`).
            let nat64 = v6.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
            let embedded = if nat64 {
                let o = v6.octets();
                Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
            } else {
                v6.to_ipv4()
            };
            embedded.and_then(local_v4)
        }
    }
}

fn local_v4(v4: Ipv4Addr) -> Option<&'static str> {
    if v4.is_loopback() {
        Some("a loopback address")
    } else if v4.octets()[0] == 0 {
        // 0.0.0.0/8 "this network": Linux connects 0.0.0.0 to the local host.
        Some("the unspecified address")
    } else if v4.is_link_local() {
        Some("a link-local (metadata) address")
    } else if v4 == ALIBABA_METADATA {
        Some("a cloud metadata address")
    } else if v4.is_broadcast() {
        Some("the broadcast address")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_and_allowed_endpoints() {
        let refused = [
            "http://127.0.0.1:1026/v2/entities",
            "http://127.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            "http://017700000001/",
            "http://0.0.0.0:8080/",
            "http://0/",
            "http://[::1]/",
            "http://[0:0:0:0:0:0:0:1]/",
            "http://[::]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://[::127.0.0.1]/",
            "http://[64:ff9b::169.254.169.254]/",
            "http://[fe80::1]/",
            "http://[fd00:ec2::254]/latest/meta-data/",
            "http://169.254.169.254/latest/meta-data/",
            "http://0xa9fea9fe/",
            "http://2852039166/",
            "http://169.254.170.2/v2/credentials",
            "http://100.100.100.200/latest/meta-data/",
            "http://255.255.255.255/",
            "http://localhost:1026/",
            "http://LOCALHOST./",
            "http://localhost.localdomain/",
            "http://api.localhost/",
            "http://ip6-localhost/",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://Metadata.Google.Internal./",
            "http://metadata/",
            "http://instance-data/",
            "http://127.0.0.1./",
            "http://%6c%6fcalhost/",
            "mqtt://%6c%6fcalhost:1883",
            "https://user:pw@127.0.0.1/",
            "mqtt://127.0.0.1:1883",
            "mqtt://0x7f.1:1883",
            "mqtts://localhost:8883",
            "mqtt://[::1]:1883",
            "ftp://example.com/",
            "file:///etc/passwd",
            "gopher://example.com/",
            "http://${host}/x",
            "http://example.com:${port}/",
            "http://${user}@example.com/",
        ];
        for e in refused {
            let r = check(e);
            assert!(
                matches!(r, Err(DenyReason::Forbidden(_))),
                "{e} should be refused (403): {r:?}"
            );
        }
        let allowed = [
            "http://hooks.example.com/ngsi",
            "https://10.0.0.5:8443/notify",
            "http://192.168.1.20/x",
            "http://172.16.0.1/x",
            "http://[fd12::1]/x",
            "http://quantumleap:8668/v2/notify",
            "http://example.com/${id}/attrs",
            "http://example.com/x?entity=${id}",
            "mqtt://mosquitto:1883",
            "mqtts://broker.example.com:8883",
            "http://100.100.100.201/",
            "http://8.8.8.8/",
        ];
        for e in allowed {
            assert_eq!(check(e), Ok(()), "{e}");
        }
        for e in ["not a url", "http://[::1/", "http://exa mple.com/"] {
            assert!(
                matches!(check(e), Err(DenyReason::BadRequest(_))),
                "{e}: {:?}",
                check(e)
            );
        }
    }
}
