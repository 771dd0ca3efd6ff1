//! Kernels from Debian packages: resolve a meta package, `apt-get download` into the cache,
//! unpack with `dpkg -x` (nothing is installed), `depmod -b`, and pick modules in load order.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The default kernel: bookworm's cloud kernel (6.1, the oldest kernel ambit supports).
pub(crate) const DEFAULT_PACKAGE: &str = "linux-image-cloud-amd64";

/// An unpacked kernel package.
#[derive(Debug)]
pub(crate) struct Kernel {
    /// The versioned image package, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub(crate) package: String,
    /// Its Debian version, e.g. `6.1.192-2`.
    pub(crate) version: String,
    /// `uname -r` of the kernel, e.g. `6.1.0-56-cloud-amd64`.
    pub(crate) release: String,
    /// Where the package is unpacked.
    root: PathBuf,
}

impl Kernel {
    /// Resolves `requested` (a kernel image package or a meta package depending on one),
    /// downloads it into `cache/debs` unless present, and unpacks it under `cache/kernels`.
    pub(crate) fn fetch(requested: &str, cache: &Path) -> Result<Self> {
        let package = resolve(requested)?;
        let version = candidate_version(&package)?;
        let debs = cache.join("debs");
        fs::create_dir_all(&debs)?;
        let deb = debs.join(format!(
            "{package}_{}_amd64.deb",
            version.replace(':', "%3a")
        ));
        if deb.exists() {
            eprintln!("==> kernel {package} {version}: cached {}", deb.display());
        } else {
            eprintln!("==> kernel {package} {version}: apt-get download");
            let status = Command::new("apt-get")
                // The cache is root's; apt's sandbox user could not write there.
                .args(["-o", "APT::Sandbox::User=root", "download"])
                .arg(format!("{package}={version}"))
                .current_dir(&debs)
                .status()
                .context("running apt-get download")?;
            if !status.success() || !deb.exists() {
                bail!("apt-get download {package}={version} failed ({status})");
            }
        }
        let root = cache.join("kernels").join(format!("{package}_{version}"));
        let stamp = root.join(".unpacked");
        if !stamp.exists() {
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(&root)?;
            run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
        }
        let release = release_of(&root)?;
        if !stamp.exists() {
            // modules.dep is made by the package's postinst, which dpkg -x does not run.
            run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
            fs::write(&stamp, "")?;
        }
        Ok(Self {
            package,
            version,
            release,
            root,
        })
    }

    /// The bootable image (`boot/vmlinuz-<release>`).
    pub(crate) fn image(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    /// The `.ko` files to load for `modules`, dependencies first, each once; built-in ones are
    /// left out. Compressed modules are unpacked into `scratch` (finit_module gets plain ELF).
    pub(crate) fn module_files(&self, modules: &[&str], scratch: &Path) -> Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = Vec::new();
        for module in modules {
            let out = Command::new("modprobe")
                .arg("-d")
                .arg(&self.root)
                .args(["-S", &self.release, "--show-depends", module])
                .output()
                .context("running modprobe (Debian package kmod)")?;
            if !out.status.success() {
                bail!(
                    "module {module} is not in {} {}: {}",
                    self.package,
                    self.version,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let Some(path) = line.strip_prefix("insmod ") else {
                    continue; // `builtin NAME`
                };
                let path = PathBuf::from(path.split_whitespace().next().unwrap_or_default());
                let plain = decompressed(&path, scratch)?;
                if !files.contains(&plain) {
                    files.push(plain);
                }
            }
        }
        Ok(files)
    }
}

/// Follows meta packages (`linux-image-cloud-amd64`) to the versioned image package.
fn resolve(requested: &str) -> Result<String> {
    let mut package = requested.to_string();
    for _ in 0..5 {
        if is_image_package(&package) {
            return Ok(package);
        }
        let out = Command::new("apt-cache")
            .args(["depends", &package])
            .output()
            .context("running apt-cache")?;
        if !out.status.success() {
            bail!(
                "apt-cache does not know {package} (try `apt-get update`): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        package = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|dep| dep.starts_with("linux-image-"))
            .with_context(|| {
                format!("{package} is neither a kernel image package nor depends on one")
            })?
            .to_string();
    }
    bail!("{requested}: too many meta packages")
}

/// `linux-image-<digit>...`: a package that holds a kernel, not a meta package.
fn is_image_package(name: &str) -> bool {
    name.strip_prefix("linux-image-")
        .and_then(|rest| rest.chars().next())
        .is_some_and(|c| c.is_ascii_digit())
}

fn candidate_version(package: &str) -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["show", "--no-all-versions", package])
        .output()
        .context("running apt-cache show")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .map(str::to_string)
        .with_context(|| format!("apt-cache show {package}: no version (try `apt-get update`)"))
}

/// The one `lib/modules/<release>` (or `usr/lib/modules`) directory of an unpacked package.
fn release_of(root: &Path) -> Result<String> {
    let lib = root.join("lib/modules");
    let usr = root.join("usr/lib/modules");
    if !lib.exists() && usr.exists() {
        // depmod -b and modprobe -d look in lib/modules; newer packages ship usr/lib/modules.
        std::os::unix::fs::symlink("usr/lib", root.join("lib"))?;
    }
    let mut releases = Vec::new();
    for entry in fs::read_dir(&lib).with_context(|| format!("{} has no modules", root.display()))? {
        releases.push(entry?.file_name().to_string_lossy().into_owned());
    }
    match releases.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one kernel in {}, found {releases:?}",
            lib.display()
        ),
    }
}

/// `path` itself for a plain `.ko`; else an unpacked copy of a `.ko.xz`/`.ko.zst`/`.ko.gz`.
fn decompressed(path: &Path, scratch: &Path) -> Result<PathBuf> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tool = match name.rsplit_once('.') {
        Some((_, "xz")) => "xz",
        Some((_, "zst")) => "zstd",
        Some((_, "gz")) => "gzip",
        _ => return Ok(path.to_path_buf()),
    };
    fs::create_dir_all(scratch)?;
    let stem = name.rsplit_once('.').map_or(name.as_ref(), |(s, _)| s);
    let out = scratch.join(stem);
    let data = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running {tool} to unpack {}", path.display()))?;
    if !data.status.success() {
        bail!("{tool} -dc {} failed", path.display());
    }
    fs::write(&out, data.stdout)?;
    Ok(out)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_packages_are_told_from_meta_packages() {
        assert!(is_image_package("linux-image-6.1.0-56-cloud-amd64"));
        assert!(is_image_package("linux-image-6.1.0-56-amd64-unsigned"));
        assert!(!is_image_package("linux-image-cloud-amd64"));
        assert!(!is_image_package("linux-headers-6.1.0-56-amd64"));
    }
}
