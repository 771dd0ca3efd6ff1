//! `ambit cni-install`: puts the plugin in the node's CNI bin dir and chains it into the node's CNI config.
//!
//! Run by the DaemonSet's init container with the host's `/opt/cni/bin` and `/etc/cni/net.d`
//! mounted. The runtime uses the lexicographically first config file in the conf dir; ambit
//! appends itself to that file's plugin list (turning a single-plugin `.conf` into a
//! `.conflist`). Every write is a temp file plus rename, so the runtime never reads half a file.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::plugin::PLUGIN_NAME;
use super::DEFAULT_SOCKET;

/// `ambit cni-install` options.
#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// The node's CNI plugin directory, as mounted in this container.
    #[arg(long, default_value = "/host/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The node's CNI config directory, as mounted in this container.
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The agent's CNI socket, as the plugin on the host sees it.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// How long to wait for the primary network plugin to write its config.
    #[arg(long, default_value_t = 300)]
    pub wait_secs: u64,
}

/// Errors installing the plugin.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The running binary could not be found or copied.
    #[error("cannot copy {} to {}", from.display(), to.display())]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// No primary network config appeared in time.
    #[error("no CNI network config (*.conflist, *.conf, *.json) in {} after {waited:?}", dir.display())]
    NoConfig { dir: PathBuf, waited: Duration },
    /// A directory or file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The primary config is not valid JSON of a network config.
    #[error("CNI config {} is not a valid network config", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The primary config has a shape we cannot chain into.
    #[error("CNI config {}: {message}", path.display())]
    Shape { path: PathBuf, message: String },
    /// The new config could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Installs the binary and chains the plugin; waits for the primary config if needed.
pub fn run(args: &InstallArgs) -> Result<(), Error> {
    let exe = std::env::current_exe().map_err(|source| Error::Copy {
        from: PathBuf::from("/proc/self/exe"),
        to: args.bin_dir.join(PLUGIN_NAME),
        source,
    })?;
    let bin = install_binary(&exe, &args.bin_dir)?;
    let wait = Duration::from_secs(args.wait_secs);
    let started = Instant::now();
    let conf = loop {
        match chain(&args.conf_dir, &args.socket) {
            Err(Error::NoConfig { .. }) if started.elapsed() < wait => {
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(Error::NoConfig { dir, .. }) => {
                return Err(Error::NoConfig {
                    dir,
                    waited: started.elapsed(),
                })
            }
            other => break other?,
        }
    };
    eprintln!(
        "ambit cni-install: installed {} and chained it into {}",
        bin.display(),
        conf.display()
    );
    Ok(())
}

/// Copies `exe` to `<bin_dir>/ambit-cni` (temp file + rename: a running plugin keeps its inode).
pub fn install_binary(exe: &Path, bin_dir: &Path) -> Result<PathBuf, Error> {
    let to = bin_dir.join(PLUGIN_NAME);
    let tmp = bin_dir.join(format!(".{PLUGIN_NAME}.tmp"));
    let err = |source| Error::Copy {
        from: exe.to_path_buf(),
        to: to.clone(),
        source,
    };
    std::fs::copy(exe, &tmp).map_err(err)?;
    std::fs::rename(&tmp, &to).map_err(err)?;
    Ok(to)
}

/// Adds (or updates) the ambit plugin in the runtime's primary network config; returns the file.
pub fn chain(conf_dir: &Path, socket: &Path) -> Result<PathBuf, Error> {
    let path = primary_config(conf_dir)?;
    let text = std::fs::read(&path).map_err(|source| Error::Read {
        path: path.clone(),
        source,
    })?;
    let conf: Value = serde_json::from_slice(&text).map_err(|source| Error::Parse {
        path: path.clone(),
        source,
    })?;
    let shape = |message: &str| Error::Shape {
        path: path.clone(),
        message: message.to_string(),
    };
    let Value::Object(mut conf) = conf else {
        return Err(shape("top level is not an object"));
    };
    let ours = json!({ "type": PLUGIN_NAME, "socketPath": socket });
    let (list, out_path) = if conf.contains_key("plugins") {
        (conf, path.clone())
    } else {
        // A single-plugin .conf becomes a .conflist with that plugin first.
        let version = conf.get("cniVersion").cloned().unwrap_or(json!("1.0.0"));
        let name = conf
            .get("name")
            .cloned()
            .unwrap_or(json!("k8s-pod-network"));
        conf.remove("cniVersion");
        let list = json!({ "cniVersion": version, "name": name, "plugins": [conf] });
        let Value::Object(list) = list else {
            return Err(shape("cannot build a conflist"));
        };
        (list, path.with_extension("conflist"))
    };
    let mut list = list;
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| shape("`plugins` is not a list"))?;
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_NAME));
    if plugins.is_empty() {
        return Err(shape(
            "`plugins` is empty: no interface plugin to chain after",
        ));
    }
    plugins.push(ours);
    // Serializing a JSON value cannot fail.
    let mut bytes = serde_json::to_vec_pretty(&Value::Object(list)).unwrap_or_default();
    bytes.push(b'\n');
    if bytes != text || out_path != path {
        let file_name = out_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // A dot name without a config extension: the runtime never loads the temp file.
        let tmp = conf_dir.join(format!(".{file_name}.ambit-tmp"));
        let err = |source| Error::Write {
            path: out_path.clone(),
            source,
        };
        std::fs::write(&tmp, &bytes).map_err(err)?;
        std::fs::rename(&tmp, &out_path).map_err(err)?;
        if out_path != path {
            std::fs::remove_file(&path).map_err(|source| Error::Write {
                path: path.clone(),
                source,
            })?;
        }
    }
    Ok(out_path)
}

/// The config file the runtime uses: the first `*.conflist`, `*.conf` or `*.json` by name.
fn primary_config(dir: &Path) -> Result<PathBuf, Error> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let hidden = p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            let ext = p.extension().and_then(|e| e.to_str());
            !hidden && matches!(ext, Some("conflist" | "conf" | "json")) && p.is_file()
        })
        .collect();
    files.sort();
    files.into_iter().next().ok_or_else(|| Error::NoConfig {
        dir: dir.to_path_buf(),
        waited: Duration::ZERO,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::{chain, Error};
    use crate::cni::plugin::tests::TempDir;

    fn read(p: &std::path::Path) -> Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    }

    #[test]
    fn appends_to_the_first_conflist_once() {
        let dir = TempDir::new("install");
        let list = json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]]}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        });
        std::fs::write(dir.0.join("10-bridge.conflist"), list.to_string()).unwrap();
        std::fs::write(
            dir.0.join("99-loopback.conf"),
            r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#,
        )
        .unwrap();
        let socket = std::path::Path::new("/run/ambit/cni.sock");
        let path = chain(&dir.0, socket).unwrap();
        assert!(path.ends_with("10-bridge.conflist"));
        let again = chain(&dir.0, socket).unwrap();
        assert_eq!(again, path);
        let v = read(&path);
        let types: Vec<&str> = v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["bridge", "portmap", "ambit-cni"]);
        assert_eq!(v["plugins"][2]["socketPath"], "/run/ambit/cni.sock");
        assert_eq!(
            v["plugins"][0]["ipam"], list["plugins"][0]["ipam"],
            "other plugins untouched"
        );
        let leftovers: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 2, "no temp files left: {leftovers:?}");
    }

    #[test]
    fn turns_a_single_plugin_conf_into_a_conflist() {
        let dir = TempDir::new("install");
        let conf = json!({"cniVersion": "0.4.0", "name": "net", "type": "bridge", "ipam": {"type": "host-local"}});
        std::fs::write(dir.0.join("10-net.conf"), conf.to_string()).unwrap();
        let path = chain(&dir.0, "/run/ambit/cni.sock".as_ref()).unwrap();
        assert!(path.ends_with("10-net.conflist"));
        assert!(!dir.0.join("10-net.conf").exists());
        let v = read(&path);
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["name"], "net");
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(v["plugins"][1]["type"], "ambit-cni");
    }

    #[test]
    fn reports_missing_and_malformed_configs_by_path() {
        let dir = TempDir::new("install");
        assert!(matches!(
            chain(&dir.0, "/s".as_ref()),
            Err(Error::NoConfig { .. })
        ));
        std::fs::write(dir.0.join("10-x.conflist"), b"{not json").unwrap();
        let err = chain(&dir.0, "/s".as_ref()).unwrap_err();
        assert!(matches!(err, Error::Parse { .. }));
        assert!(err.to_string().contains("10-x.conflist"), "{err}");
        std::fs::write(dir.0.join("10-x.conflist"), br#"{"name":"x","plugins":[]}"#).unwrap();
        let err = chain(&dir.0, "/s".as_ref()).unwrap_err().to_string();
        assert!(err.contains("no interface plugin"), "{err}");
    }
}
