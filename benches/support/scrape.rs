//! The server's Prometheus endpoint: fetching `/metrics` and reading samples
//! out of the text format.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// `GET /metrics` over plain HTTP/1.1.
pub fn scrape(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").ok_or("no HTTP header")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or("").to_owned());
    }
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Ok(body.to_owned());
    }
    let (mut out, mut rest) = (String::new(), body);
    while let Some((len, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).map_err(|_| "bad chunk")?;
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    Ok(out)
}

/// Sum of the samples of `name` whose labels contain every `filter` string;
/// `None` when the server does not export `name` (an older build).
pub fn metric(text: &str, name: &str, filter: &[&str]) -> Option<f64> {
    let mut sum = None;
    for (series, value) in text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.rsplit_once(' ')) {
        let (n, labels) = series.split_at(series.find('{').unwrap_or(series.len()));
        if n == name && filter.iter().all(|f| labels.contains(f)) {
            *sum.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

/// RPCs the servers answered with anything but OK, by `method`/`code` labels.
pub fn non_ok_rpcs(text: &str, into: &mut BTreeMap<String, f64>) {
    for (series, value) in text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.rsplit_once(' ')) {
        if let Some(labels) = series.strip_prefix("takumo_keys_rpc_requests_total")
            && !labels.contains("code=\"OK\"")
        {
            let v = value.parse::<f64>().unwrap_or(0.0);
            if v > 0.0 {
                *into.entry(labels.trim_matches(|c| c == '{' || c == '}').replace('"', "")).or_default() += v;
            }
        }
    }
}
