//! Reading what tcpdump wrote: pcap records → TCP segments → reassembled byte streams per
//! direction, and a TLS record check on those streams. Enough for the underlay tests to say
//! "this stream is TLS from its first byte" and "this marker never crossed the wire".
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{bail, Result};

/// One TCP segment seen on the wire.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Sender.
    pub src: SocketAddr,
    /// Receiver.
    pub dst: SocketAddr,
    /// Sequence number of the first payload byte (of the SYN itself when `syn`).
    pub seq: u32,
    /// SYN flag.
    pub syn: bool,
    /// Payload.
    pub payload: Vec<u8>,
}

/// One direction of one TCP connection, reassembled.
#[derive(Debug, Clone)]
pub struct Flow {
    /// Sender.
    pub src: SocketAddr,
    /// Receiver.
    pub dst: SocketAddr,
    /// The capture saw the SYN, so `bytes` starts at the first byte of the stream.
    pub from_start: bool,
    /// The payload in sequence order (retransmissions removed; gaps are not filled).
    pub bytes: Vec<u8>,
}

/// A TLS record header: content type (20 change_cipher_spec, 21 alert, 22 handshake,
/// 23 application_data) and body length; for handshake records, the first message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsRecord {
    /// Content type.
    pub content_type: u8,
    /// Body length.
    pub len: usize,
    /// First handshake message type (1 ClientHello, 2 ServerHello) of a handshake record.
    pub handshake: Option<u8>,
}

/// Parses a pcap file (classic format, micro- or nanosecond, either byte order) with Ethernet,
/// Linux cooked v1 or v2 link headers; returns its TCP segments over IPv4 and IPv6.
pub fn segments(file: &[u8]) -> Result<Vec<Segment>> {
    if file.len() < 24 {
        bail!("pcap file too short ({} bytes)", file.len());
    }
    let magic = [file[0], file[1], file[2], file[3]];
    let little = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => bail!("not a pcap file (magic {magic:02x?})"),
    };
    let u32_at = |b: &[u8], at: usize| {
        let w = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if little {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    let linktype = u32_at(file, 20);
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= file.len() {
        let caplen = u32_at(file, at + 8) as usize;
        let start = at + 16;
        let end = start + caplen;
        if end > file.len() {
            break; // tcpdump was stopped mid-record
        }
        if let Some(seg) = frame(linktype, &file[start..end]) {
            out.push(seg);
        }
        at = end;
    }
    Ok(out)
}

/// Groups segments into directional flows and reassembles each one.
pub fn flows(segments: &[Segment]) -> Vec<Flow> {
    let mut by_dir: BTreeMap<(SocketAddr, SocketAddr), Vec<&Segment>> = BTreeMap::new();
    for s in segments {
        by_dir.entry((s.src, s.dst)).or_default().push(s);
    }
    by_dir
        .into_iter()
        .map(|((src, dst), segs)| {
            let syn = segs.iter().find(|s| s.syn);
            // Sequence numbers relative to the stream start (SYN + 1), or to the first segment.
            let base = syn.map_or_else(
                || segs.iter().map(|s| s.seq).next().unwrap_or(0),
                |s| s.seq.wrapping_add(1),
            );
            let mut data: Vec<(u32, &[u8])> = segs
                .iter()
                .filter(|s| !s.payload.is_empty())
                .map(|s| (s.seq.wrapping_sub(base), s.payload.as_slice()))
                .collect();
            data.sort_by_key(|(off, _)| *off);
            let mut bytes = Vec::new();
            for (off, payload) in data {
                let off = off as usize;
                let have = bytes.len();
                if off + payload.len() <= have {
                    continue; // a retransmission of bytes we have
                }
                let skip = have.saturating_sub(off);
                bytes.extend_from_slice(&payload[skip..]);
            }
            Flow {
                src,
                dst,
                from_start: syn.is_some(),
                bytes,
            }
        })
        .collect()
}

/// Parses `bytes` as a sequence of TLS records from its first byte. A last record cut short
/// (the capture stopped) is accepted; anything that is not a record header is an error.
pub fn tls_records(bytes: &[u8]) -> Result<Vec<TlsRecord>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        if bytes.len() - at < 5 {
            return Err(format!("{} stray bytes at offset {at}", bytes.len() - at));
        }
        let content_type = bytes[at];
        let version = u16::from_be_bytes([bytes[at + 1], bytes[at + 2]]);
        let len = usize::from(u16::from_be_bytes([bytes[at + 3], bytes[at + 4]]));
        if !(20..=23).contains(&content_type) || !(0x0301..=0x0303).contains(&version) {
            return Err(format!(
                "no TLS record header at offset {at}: {:02x?}",
                &bytes[at..(at + 8).min(bytes.len())]
            ));
        }
        // TLS 1.3 allows 2^14 + 256 bytes of ciphertext per record.
        if len > 16384 + 256 {
            return Err(format!("record of {len} bytes at offset {at}"));
        }
        let handshake = (content_type == 22)
            .then(|| bytes.get(at + 5).copied())
            .flatten();
        out.push(TlsRecord {
            content_type,
            len,
            handshake,
        });
        at += 5 + len;
    }
    Ok(out)
}

/// How often `needle` occurs in `haystack`.
pub fn count(haystack: &[u8], needle: &[u8]) -> usize {
    if needle.is_empty() || haystack.len() < needle.len() {
        return 0;
    }
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

/// The TCP segment in one captured frame, if it is TCP over IPv4 or IPv6.
fn frame(linktype: u32, f: &[u8]) -> Option<Segment> {
    let (ethertype, l3) = match linktype {
        // Ethernet, with an optional 802.1Q tag.
        1 => {
            let mut et = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
            let mut at = 14;
            if et == 0x8100 {
                et = u16::from_be_bytes([*f.get(16)?, *f.get(17)?]);
                at = 18;
            }
            (et, f.get(at..)?)
        }
        // Linux cooked v1: protocol at 14, 16-byte header.
        113 => (u16::from_be_bytes([*f.get(14)?, *f.get(15)?]), f.get(16..)?),
        // Linux cooked v2: protocol first, 20-byte header.
        276 => (u16::from_be_bytes([*f.first()?, *f.get(1)?]), f.get(20..)?),
        _ => return None,
    };
    let (src, dst, l4) = match ethertype {
        0x0800 => {
            let ihl = usize::from(l3.first()? & 0x0f) * 4;
            if *l3.get(9)? != 6 {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([*l3.get(2)?, *l3.get(3)?]));
            let src = Ipv4Addr::new(l3[12], l3[13], l3[14], l3[15]);
            let dst = Ipv4Addr::new(*l3.get(16)?, l3[17], l3[18], l3[19]);
            (
                IpAddr::V4(src),
                IpAddr::V4(dst),
                l3.get(ihl..total.min(l3.len()))?,
            )
        }
        0x86dd => {
            if *l3.get(6)? != 6 {
                return None; // extension headers are not used in the testbed
            }
            let len = usize::from(u16::from_be_bytes([*l3.get(4)?, *l3.get(5)?]));
            let src: [u8; 16] = l3.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = l3.get(24..40)?.try_into().ok()?;
            (
                IpAddr::V6(Ipv6Addr::from(src)),
                IpAddr::V6(Ipv6Addr::from(dst)),
                l3.get(40..(40 + len).min(l3.len()))?,
            )
        }
        _ => return None,
    };
    let sport = u16::from_be_bytes([*l4.first()?, *l4.get(1)?]);
    let dport = u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]);
    let seq = u32::from_be_bytes([*l4.get(4)?, l4[5], l4[6], l4[7]]);
    let offset = usize::from(l4.get(12)? >> 4) * 4;
    let flags = *l4.get(13)?;
    Some(Segment {
        src: SocketAddr::new(src, sport),
        dst: SocketAddr::new(dst, dport),
        seq,
        syn: flags & 0x02 != 0,
        payload: l4.get(offset..)?.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pcap (little-endian, Ethernet) holding `frames`.
    fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        f.extend_from_slice(&[2, 0, 4, 0]);
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&65535u32.to_le_bytes());
        f.extend_from_slice(&1u32.to_le_bytes());
        for fr in frames {
            f.extend_from_slice(&[0; 8]);
            f.extend_from_slice(&(fr.len() as u32).to_le_bytes());
            f.extend_from_slice(&(fr.len() as u32).to_le_bytes());
            f.extend_from_slice(fr);
        }
        f
    }

    fn tcp4(sport: u16, dport: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut fr = vec![0u8; 12];
        fr.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + 20 + payload.len()) as u16;
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0, 0, 64, 6, 0, 0, 10, 1, 0, 2, 10, 2, 0, 2]);
        let mut tcp = Vec::new();
        tcp.extend_from_slice(&sport.to_be_bytes());
        tcp.extend_from_slice(&dport.to_be_bytes());
        tcp.extend_from_slice(&seq.to_be_bytes());
        tcp.extend_from_slice(&[0, 0, 0, 0, 0x50, flags, 0, 0, 0, 0, 0, 0]);
        fr.extend(ip);
        fr.extend(tcp);
        fr.extend_from_slice(payload);
        fr
    }

    #[test]
    fn reassembles_in_sequence_order_without_retransmissions() {
        let file = pcap(&[
            tcp4(5000, 15008, 99, 0x02, b""),
            tcp4(5000, 15008, 105, 0x18, b"world"),
            tcp4(5000, 15008, 100, 0x18, b"hello"),
            tcp4(5000, 15008, 100, 0x18, b"hello"),
        ]);
        let segs = segments(&file).unwrap();
        assert_eq!(segs.len(), 4);
        let flows = flows(&segs);
        assert_eq!(flows.len(), 1);
        assert!(flows[0].from_start);
        assert_eq!(flows[0].bytes, b"helloworld".to_vec());
        assert_eq!(flows[0].dst.port(), 15008);
    }

    #[test]
    fn tls_records_accept_tls_and_reject_plaintext() {
        let mut tls = vec![22, 3, 1, 0, 4, 1, 0, 0, 0];
        tls.extend_from_slice(&[23, 3, 3, 0, 2, 0xaa, 0xbb]);
        let recs = tls_records(&tls).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].handshake, Some(1));
        assert_eq!(recs[1].content_type, 23);
        assert!(tls_records(b"GET / HTTP/1.1\r\n").is_err());
        assert_eq!(count(b"xxMARKxxMARK", b"MARK"), 2);
    }
}
