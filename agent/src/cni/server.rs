//! The agent's end of the CNI socket: accepts plugin calls and answers each through a handler.
use std::os::fd::RawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::statfs::{statfs, NSFS_MAGIC};
use tokio::net::{UnixListener, UnixStream};

use super::{wire, CniCommand, CniEvent, CniReply, NetnsId};

/// Decides what to do with one plugin call; may block (it runs on the blocking pool).
pub type Handler = Arc<dyn Fn(CniEvent) -> CniReply + Send + Sync>;

/// How long a connected plugin may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors setting up the CNI socket.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be created.
    #[error("cannot bind CNI socket {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the CNI socket (replacing a stale one), restricted to its owner.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    crate::sys::bind_owner_only(path)
        .and_then(UnixListener::from_std)
        .map_err(|source| Error::Bind {
            path: path.to_path_buf(),
            source,
        })
}

/// Serves plugin calls until the task is dropped. Only peers with the agent's own uid (root in
/// a cluster: the container runtime) are served.
pub async fn serve(listener: UnixListener, handler: Handler) {
    let own_uid = nix::unistd::geteuid().as_raw();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "CNI socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if stream.peer_cred().map(|c| c.uid()).ok() != Some(own_uid) {
            tracing::warn!("CNI connection from a peer with another uid refused");
            continue;
        }
        tokio::spawn(handle(stream, handler.clone()));
    }
}

async fn handle(mut stream: UnixStream, handler: Handler) {
    let request = tokio::time::timeout(READ_TIMEOUT, wire::read_request(&mut stream)).await;
    let (body, fds) = match request {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read CNI request");
            return;
        }
        Err(_) => {
            tracing::warn!("CNI request not received in time");
            return;
        }
    };
    let reply = match decode(&body, &fds) {
        Ok(event) => {
            let span = tracing::info_span!(
                "cni",
                command = ?event.command,
                pod = %event.pod.key(),
                container.id = %event.container_id,
            );
            let handler = handler.clone();
            let reply = tokio::task::spawn_blocking(move || {
                let _entered = span.enter();
                handler(event)
            })
            .await;
            reply.unwrap_or_else(|e| CniReply::Failed {
                message: format!("agent CNI handler failed: {e}"),
            })
        }
        Err(message) => {
            tracing::warn!(error = %message, "CNI request rejected");
            CniReply::Failed { message }
        }
    };
    wire::close_all(&fds);
    if let Err(e) = wire::write_reply(&mut stream, &reply).await {
        tracing::warn!(error = %e, "cannot answer CNI request");
    }
}

/// Parses a request and checks the netns fd (if any) against the netns path.
fn decode(body: &[u8], fds: &[RawFd]) -> Result<CniEvent, String> {
    let mut event: CniEvent =
        serde_json::from_slice(body).map_err(|e| format!("malformed CNI request: {e}"))?;
    event.netns_id = None;
    let Some(fd) = fds.first() else {
        return Ok(event);
    };
    let id = netns_of_fd(*fd)?;
    event.netns_id = Some(id);
    // DEL may arrive after the namespace is gone; only ADD and CHECK need to see it.
    if event.command == CniCommand::Del {
        return Ok(event);
    }
    if let Some(path) = &event.netns {
        let md = std::fs::metadata(path).map_err(|e| {
            format!(
                "network namespace {} is not visible to the agent (is the netns directory \
                 mounted with HostToContainer propagation?): {e}",
                path.display()
            )
        })?;
        if (md.dev(), md.ino()) != (id.dev, id.ino) {
            return Err(format!(
                "network namespace {} is not the namespace passed by the plugin",
                path.display()
            ));
        }
    }
    Ok(event)
}

/// Device and inode of the namespace behind `fd`; an error if it is not a namespace file.
/// (Whether it is a *network* namespace is settled by `setns(CLONE_NEWNET)` at enrollment.)
fn netns_of_fd(fd: RawFd) -> Result<NetnsId, String> {
    // The magic link resolves to the nsfs inode whether the fd came from /proc/<pid>/ns/net or
    // from a bind mount such as /run/netns/<name>.
    let link = format!("/proc/self/fd/{fd}");
    let fs = statfs(link.as_str())
        .map_err(|e| format!("cannot inspect the fd passed by the plugin: statfs: {e}"))?;
    if fs.filesystem_type() != NSFS_MAGIC {
        let target = std::fs::read_link(&link).unwrap_or_default();
        return Err(format!(
            "the fd passed by the plugin is not a network namespace ({})",
            target.display()
        ));
    }
    let st = nix::sys::stat::fstat(fd)
        .map_err(|e| format!("fstat on the netns fd passed by the plugin: {e}"))?;
    Ok(NetnsId {
        dev: st.st_dev,
        ino: st.st_ino,
    })
}
