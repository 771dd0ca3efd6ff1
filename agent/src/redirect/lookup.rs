//! Per-pod copies of `lookup_steer`, each with its pod's netns cookie as a load-time constant.
//!
//! sk_lookup must steer every inbound connection into the pod's namespace, on any local address,
//! so it has to know the namespace it runs in; but the kernel offers no `bpf_get_netns_cookie`
//! to sk_lookup programs (checked on 6.1 and 6.18: "program of this type cannot use helper"),
//! and the program context names addresses and an interface index, never the namespace. So the
//! program is loaded once per pod with `cfg_netns_cookie` set. Each copy is its own load of the
//! object (the maps are the pinned ones, shared); only `lookup_steer` is verified and loaded.
//! A copy costs the kernel the program and the object's BTF (~15 KB) per pod.
use std::path::{Path, PathBuf};

use aya::programs::links::FdLink;
use aya::programs::SkLookup;
use aya::{Ebpf, EbpfLoader};
use socket2::{Domain, Socket, Type};

use super::{pin_link, program, Error, BPF_OBJECT};
use crate::config::Config;
use crate::sys::{self, Netns};

/// The load-time settings (`cfg_*` globals) every load of the object gets.
#[derive(Debug, Clone)]
pub(super) struct Globals {
    pin_dir: PathBuf,
    out_mark: u32,
    deliver_mark: u32,
    outbound_port: u16,
    inbound_port: u16,
    tunnel_port: u16,
}

impl Globals {
    /// The settings of `cfg`.
    pub(super) fn new(cfg: &Config) -> Self {
        Self {
            pin_dir: cfg.bpf_pin_dir.clone(),
            out_mark: cfg.outbound_mark,
            deliver_mark: cfg.deliver_mark,
            outbound_port: cfg.ports.outbound,
            inbound_port: cfg.ports.inbound_plaintext,
            tunnel_port: cfg.ports.tunnel,
        }
    }

    /// A loader of the object with these settings, its maps pinned under the pin dir (maps
    /// already pinned there are reused).
    pub(super) fn loader(&self) -> EbpfLoader<'_> {
        let mut l = EbpfLoader::new();
        l.default_map_pin_directory(&self.pin_dir)
            .override_global("cfg_out_mark", &self.out_mark, true)
            .override_global("cfg_deliver_mark", &self.deliver_mark, true)
            .override_global("cfg_outbound_port", &self.outbound_port, true)
            .override_global("cfg_inbound_port", &self.inbound_port, true)
            .override_global("cfg_tunnel_port", &self.tunnel_port, true);
        l
    }

    /// Loads a copy of `lookup_steer` for the netns `netns` (its cookie read from a socket
    /// made there), not attached yet. This is the slow part of enrolling a pod (an object load
    /// and a verification: ~150 ms in a debug build on a busy host).
    pub(super) fn load_lookup(&self, netns: &Netns) -> Result<LookupProgram, Error> {
        let name = "lookup_steer";
        let started = std::time::Instant::now();
        let netns_cookie = cookie_of(netns)?;
        let mut bpf = self
            .loader()
            .override_global("cfg_netns_cookie", &netns_cookie, true)
            .load(BPF_OBJECT)
            .map_err(|source| Error::Load {
                pin_dir: self.pin_dir.clone(),
                source: Box::new(source),
            })?;
        let prog: &mut SkLookup = program(&mut bpf, name)?;
        prog.load().map_err(|source| Error::ProgramLoad {
            program: name,
            source,
        })?;
        tracing::debug!(netns.cookie = netns_cookie, dur = ?started.elapsed(), "sk_lookup program loaded");
        Ok(LookupProgram { netns_cookie, bpf })
    }
}

/// A pod's own copy of `lookup_steer`, loaded for its netns and not attached yet.
pub struct LookupProgram {
    netns_cookie: u64,
    bpf: Ebpf,
}

impl LookupProgram {
    /// The netns cookie the program was loaded for.
    pub fn netns_cookie(&self) -> u64 {
        self.netns_cookie
    }

    /// Attaches the program to `netns` and pins the link at `pin` (replacing a previous
    /// agent's pin only once the new link is attached). The link holds the program; the rest
    /// of this load is dropped.
    pub(super) fn attach(mut self, netns: &Netns, pin: &Path) -> Result<FdLink, Error> {
        let name = "lookup_steer";
        let prog: &mut SkLookup = program(&mut self.bpf, name)?;
        let attach_err = |source| Error::Attach {
            program: name,
            target: netns.path().into(),
            source,
        };
        let id = prog.attach(netns.file()).map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        pin_link(FdLink::from(link), pin)
    }
}

/// The cookie of `netns`, from a socket made inside it.
fn cookie_of(netns: &Netns) -> Result<u64, Error> {
    let err = |source| Error::NetnsSocket {
        path: netns.path().into(),
        source,
    };
    let socket = netns
        .run(|| Socket::new(Domain::IPV4, Type::STREAM, None))?
        .map_err(err)?;
    Ok(sys::netns_cookie(&socket)?)
}
